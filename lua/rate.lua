-- rate: counts one event in a fixed window.
-- KEYS[1]  counter                 {rate:<what>}
-- ARGV[1]  events allowed per window
-- ARGV[2]  window (ms)
-- Returns 0 while within the limit, else the ms until the window ends.
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if n <= tonumber(ARGV[1]) then
  return 0
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  -- A counter without expiry (cannot happen but for a lost PEXPIRE): give it one now.
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  ttl = tonumber(ARGV[2])
end
return ttl
