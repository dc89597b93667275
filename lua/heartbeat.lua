#!lua flags=allow-oom
-- heartbeat: refreshes a live instance, unless it was written off.
-- allow-oom: liveness must go on when Redis is full (maxmemory, noeviction); this only
-- writes a few bytes per instance at most, so it cannot be what fills it.
-- KEYS[1]  live instances zset     {instances}:alive
-- ARGV[1]  instance id
-- Returns 1 when refreshed, 0 when the instance is no longer registered (it was reaped or
-- deregistered): the caller must fence itself and register under a new id.
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now, ARGV[1])
return 1
