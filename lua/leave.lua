#!lua flags=allow-oom
-- leave: removes a peer from its room and deletes the offers queued for it. The last leave
-- starts the session's countdown: its ttl is counted from here (members keep it alive).
-- allow-oom: liveness must go on when Redis is full (maxmemory, noeviction); this only
-- writes a few bytes per instance at most, so it cannot be what fills it.
-- KEYS[1]  members hash            {S}:peers
-- KEYS[2]  server peer string      {S}:server
-- KEYS[3]  the peer's offer list   {S}:offers:<peer>
-- KEYS[4]  join counter            {S}:seq
-- KEYS[5]  session hash            {S}:session (ttl reset when the room empties)
-- KEYS[6]  the session's tokens    {S}:tokens  (likewise; the caller refreshes each token)
-- ARGV[1]  peer id
-- ARGV[2]  expected owner instance id ('' = any): a reaper or a fenced instance only removes
--          the peers that instance owned
-- ARGV[3]  session ttl (ms)
-- Returns {'0'} when nothing changed (not a member, or another owner), else
-- {'1', id1, rec1, ...}: the remaining members, to be told peer_left ({'1'}: it was the last).
local rec = redis.call('HGET', KEYS[1], ARGV[1])
if not rec then
  return {'0'}
end
if ARGV[2] ~= '' then
  local owner = string.match(rec, '^[^|]*|[^|]*|[^|]*|([^|]*)|')
  if owner ~= ARGV[2] then
    return {'0'}
  end
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3])
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
local out = {'1'}
local all = redis.call('HGETALL', KEYS[1])
if #all == 0 then
  redis.call('DEL', KEYS[4])
  redis.call('PEXPIRE', KEYS[5], ARGV[3])
  redis.call('PEXPIRE', KEYS[6], ARGV[3])
end
for i = 1, #all do
  out[#out + 1] = all[i]
end
return out
