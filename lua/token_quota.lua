-- token_quota: takes one token from a session's lifetime quota.
-- KEYS[1]  session hash            {S}:session
-- KEYS[2]  the session's tokens    {S}:tokens
-- ARGV[1]  tokens a session may mint in its life
-- ARGV[2]  session ttl (ms), for a session without one
-- ARGV[3]  the new token
-- ARGV[4]  1: listed in {S}:tokens (refreshed with the session); 0: short-lived (relay)
-- Returns the session's remaining ttl (ms, > 0) when a token may be minted, -1 when the
-- session does not exist, -2 when its quota is spent. The caller then writes {T}:token.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local minted = tonumber(redis.call('HGET', KEYS[1], 'minted') or '0')
if minted >= tonumber(ARGV[1]) then
  return -2
end
redis.call('HINCRBY', KEYS[1], 'minted', 1)
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 1 then
  ttl = tonumber(ARGV[2])
end
if ARGV[4] == '1' then
  redis.call('SADD', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return ttl
