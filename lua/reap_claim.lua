#!lua flags=allow-oom
-- reap_claim: writes off silent instances and claims one dead instance to clean up.
-- allow-oom: liveness must go on when Redis is full (maxmemory, noeviction); this only
-- writes a few bytes per instance at most, so it cannot be what fills it.
-- KEYS[1]  live instances zset     {instances}:alive
-- KEYS[2]  dead instances zset     {instances}:dead  (score = end of the current claim, ms)
-- KEYS[3]  claim holders hash      {instances}:reaper (dead id -> reaper id)
-- ARGV[1]  reaper instance id
-- ARGV[2]  instance timeout (ms): a heartbeat older than this writes an instance off
-- ARGV[3]  lease (ms): how long the claim holds without renewal
-- Returns {} when there is nothing to reap, else {dead instance id}. A claim whose lease ran out
-- (its reaper died mid-way) is claimed again, so the work resumes.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, 100)
for _, id in ipairs(stale) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZADD', KEYS[2], 'NX', 0, id)
end
local free = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 2)
for _, id in ipairs(free) do
  if id ~= ARGV[1] then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), id)
    redis.call('HSET', KEYS[3], id, ARGV[1])
    return {id}
  end
end
return {}
