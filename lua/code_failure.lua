-- code_failure: counts wrong join codes of one session in a sliding window.
-- KEYS[1]  failures sorted set     {S}:codefail  (member = nonce, score = ms)
-- ARGV[1]  window (ms)
-- ARGV[2]  '1' to record one failure now, '0' to only count
-- ARGV[3]  unique nonce for the new member
-- Returns the failures within the window (the new one included).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
if ARGV[2] == '1' then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return redis.call('ZCARD', KEYS[1])
