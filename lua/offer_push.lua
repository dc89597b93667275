-- offer_push: queues an offer for one recipient (FIFO, capped, oldest dropped).
-- KEYS[1]  offer list              {S}:offers:<peer>  (entries "<ms>|<payload>")
-- ARGV[1]  payload
-- ARGV[2]  max queued offers
-- ARGV[3]  mailbox ttl (ms)
-- Returns the queue length after the push.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('RPUSH', KEYS[1], string.format('%.0f', now) .. '|' .. ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return redis.call('LLEN', KEYS[1])
