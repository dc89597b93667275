#!lua flags=allow-oom
-- reap_lease: renews or releases a reaper's claim on a dead instance.
-- allow-oom: liveness must go on when Redis is full (maxmemory, noeviction); this only
-- writes a few bytes per instance at most, so it cannot be what fills it.
-- KEYS[1]  dead instances zset     {instances}:dead
-- KEYS[2]  claim holders hash      {instances}:reaper
-- ARGV[1]  dead instance id
-- ARGV[2]  reaper instance id
-- ARGV[3]  lease (ms)
-- ARGV[4]  'renew' to extend the claim, 'done' to forget the dead instance (all its peers gone)
-- Returns 1 on success, 0 when the claim is no longer this reaper's (stop working on it).
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then
  return 0
end
if ARGV[4] == 'done' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), ARGV[1])
return 1
