#!lua flags=allow-oom
-- instance_register: records a new live instance, unless its id was written off already.
-- allow-oom: liveness must go on when Redis is full (maxmemory, noeviction); this only
-- writes a few bytes per instance at most, so it cannot be what fills it.
-- KEYS[1]  live instances zset     {instances}:alive (member = instance id, score = last beat ms)
-- KEYS[2]  dead instances zset     {instances}:dead
-- ARGV[1]  instance id
-- Returns the Redis time (ms) of the registration, or 0 when the id is in the dead set (e.g. a
-- retried registration whose first attempt went through and was then written off): a reaper
-- removes whatever it owns, so it must never be live again; the caller takes a fresh id.
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
return now
