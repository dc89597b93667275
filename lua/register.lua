-- register: stores a new host session unless its id is taken (exactly one racer wins).
-- KEYS[1]  session hash            {S}:session
-- ARGV[1]  join code salt
-- ARGV[2]  join code hash
-- ARGV[3]  session ttl (ms)
-- Returns created_at (unix seconds, Redis TIME) when stored, 0 when the id is taken.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local now = tonumber(redis.call('TIME')[1])
redis.call('HSET', KEYS[1], 'created_at', now, 'salt', ARGV[1], 'hash', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return now
