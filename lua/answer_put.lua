-- answer_put: stores the answer of one handshake for its recipient, within the sender's quota.
-- KEYS[1]  answer string           {S}:answer:<to>:<handshake>
-- KEYS[2]  sender's quota zset     {S}:answers:<to>:<from>  (handshake -> ms)
-- ARGV[1]  payload
-- ARGV[2]  handshake id
-- ARGV[3]  mailbox ttl (ms)
-- ARGV[4]  answers one sender may have waiting for one recipient
-- ARGV[5]  sender id: stored as "<from>|<payload>", so that whoever takes it can give the
--          sender's quota back
-- Returns 1 when stored, 0 when the sender's quota is spent (nothing stored).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
if not redis.call('ZSCORE', KEYS[2], ARGV[2]) and
    redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('SET', KEYS[1], ARGV[5] .. '|' .. ARGV[1], 'PX', ttl)
return 1
