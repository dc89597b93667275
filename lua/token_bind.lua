-- token_bind: makes a peer the one acting through a token (its WebSocket joined through it).
-- KEYS[1]  token hash              {T}:token
-- ARGV[1]  peer id
-- ARGV[2]  ttl (ms): the token lives as long as the session it was just used to join
-- Returns 1, or 0 when the token is gone (it is never recreated).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'p', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
