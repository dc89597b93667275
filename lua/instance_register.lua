#!lua flags=allow-oom
-- instance_register: records a new live instance.
-- allow-oom: liveness must go on when Redis is full (maxmemory, noeviction); this only
-- writes a few bytes per instance at most, so it cannot be what fills it.
-- KEYS[1]  live instances zset     {instances}:alive (member = instance id, score = last beat ms)
-- ARGV[1]  instance id
-- Returns the Redis time (ms) of the registration.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
return now
