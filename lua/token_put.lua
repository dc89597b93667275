-- token_put: writes a capability token (its own slot), with its session's ttl.
-- KEYS[1]  token hash              {T}:token  (s = session, g = grant, p = peer once bound)
-- ARGV[1]  session id
-- ARGV[2]  grant: 'host' or 'joiner'
-- ARGV[3]  ttl (ms)
-- Returns 1, or 0 when the token exists already (never overwritten).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 's', ARGV[1], 'g', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
