#!lua flags=allow-oom
-- deregister: removes an instance from the live set (shutdown, or fencing itself).
-- allow-oom: liveness must go on when Redis is full (maxmemory, noeviction); this only
-- writes a few bytes per instance at most, so it cannot be what fills it.
-- KEYS[1]  live instances zset     {instances}:alive
-- KEYS[2]  dead instances zset     {instances}:dead (member = instance id, score = lease end ms)
-- ARGV[1]  instance id
-- ARGV[2]  '1' when it may still own peers: it is then queued for reaping, '0' otherwise
-- Returns 1 when it was registered, 0 otherwise.
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if removed == 1 and ARGV[2] == '1' then
  redis.call('ZADD', KEYS[2], 'NX', 0, ARGV[1])
end
return removed
