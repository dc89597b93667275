-- instance_register: records a new live instance.
-- KEYS[1]  live instances zset     {instances}:alive (member = instance id, score = last beat ms)
-- ARGV[1]  instance id
-- Returns the Redis time (ms) of the registration.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
return now
