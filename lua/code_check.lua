-- code_check: counts and compares a join code in one atomic step, so that any number of
-- concurrent guesses (on any instance, any path) is held to the limits exactly.
-- KEYS[1]  session hash            {S}:session
-- KEYS[2]  failures, everywhere    {S}:codefail            (zset: nonce -> ms)
-- KEYS[3]  failures, this client   {S}:codefail@<address>  (zset: nonce -> ms)
-- ARGV[1]  HMAC of the candidate code
-- ARGV[2]  window (ms)
-- ARGV[3]  failures tolerated from one client within the window
-- ARGV[4]  failures tolerated from everywhere within the window
-- ARGV[5]  unique nonce for a new failure
-- Returns {'correct', created_at, relay ('1' or '')} (the session, so that a join with the code
-- needs no other read), {'wrong'}, {'notfound'} or {'locked', ms until a failure expires}.
-- Past either limit nothing is compared: the right code is refused too, so no number of
-- guesses can be spread over a limit.
local session = redis.call('HMGET', KEYS[1], 'hash', 'created_at', 'relay')
local stored = session[1]
if not stored or not session[2] then
  return {'notfound'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
for i, limit in ipairs({tonumber(ARGV[3]), tonumber(ARGV[4])}) do
  local key = KEYS[4 - i]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) >= limit then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    local wait = tonumber(oldest[2]) + window - now
    if wait < 1 then
      wait = 1
    end
    return {'locked', tostring(wait)}
  end
end
if stored == ARGV[1] then
  return {'correct', session[2], session[3] or ''}
end
for i = 2, 3 do
  redis.call('ZADD', KEYS[i], now, ARGV[5])
  redis.call('PEXPIRE', KEYS[i], window)
end
return {'wrong'}
