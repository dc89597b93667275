-- register: stores a new host session unless its id is taken (exactly one racer wins).
-- KEYS[1]  session hash            {S}:session
-- KEYS[2]  the session's tokens    {S}:tokens
-- ARGV[1]  HMAC of the join code under the server secret (the secret never reaches Redis)
-- ARGV[2]  session ttl (ms)
-- ARGV[3]  the host token (written by the caller just before, in its own slot)
-- ARGV[4]  1 for a relay session, else 0
-- Returns created_at (unix seconds, Redis TIME) when stored, 0 when the id is taken.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local now = tonumber(redis.call('TIME')[1])
-- minted = 1: the host token, written by the caller just before.
redis.call('HSET', KEYS[1], 'created_at', now, 'hash', ARGV[1], 'minted', 1, 'relay', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return now
