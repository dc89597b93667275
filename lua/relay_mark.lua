-- relay_mark: now (Redis TIME, the same clock for every instance) is the session's last host
-- event: host sockets arriving within the fresh window after it may be paired.
-- KEYS[1]  the last host event (ms)      {S}:relay:mark
-- ARGV[1]  ttl (ms)
-- Returns {now, the previous mark or 0}, for relay_unmark.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prev = tonumber(redis.call('GET', KEYS[1]) or '0')
redis.call('SET', KEYS[1], now, 'PX', ARGV[1])
return {now, prev}
