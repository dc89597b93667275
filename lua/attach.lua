-- attach: the peer-session id of a host session, created on first use and reused after.
-- KEYS[1]  session hash            {S}:session
-- KEYS[2]  alias string            {S}:alias
-- ARGV[1]  candidate peer-session id (used only when none exists yet)
-- Returns {} when the session does not exist, else {alias id, remaining session ttl ms}.
-- The caller then writes the reverse key {alias}:host (another slot), which is idempotent.
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then
  return {}
end
local alias = redis.call('GET', KEYS[2])
if not alias then
  alias = ARGV[1]
  redis.call('SET', KEYS[2], alias)
end
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
else
  redis.call('PERSIST', KEYS[2])
end
return {alias, tostring(ttl)}
