#!lua flags=allow-oom
-- touch: keeps a room with members alive: gives its keys the session ttl again. Called in
-- batches by each instance's refresher for the rooms it holds members of, every ~ttl/4.
-- allow-oom: a full Redis must not expire live sessions; this only changes ttls.
-- KEYS[1]  members hash            {S}:peers
-- KEYS[2]  join counter            {S}:seq
-- KEYS[3]  server peer string      {S}:server
-- KEYS[4]  session hash            {S}:session
-- KEYS[5]  the session's tokens    {S}:tokens
-- ARGV[1]  session ttl (ms)
-- Returns the session's tokens (the caller refreshes each in its own slot), or {} when the
-- room has no members: nothing is refreshed, its session counts down from its last leave.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {}
end
for i = 1, 5 do
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
return redis.call('SMEMBERS', KEYS[5])
