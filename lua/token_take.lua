-- token_take: uses a relay joiner's token, once.
-- KEYS[1]  token hash              {T}:token  (s = session, g = grant)
-- Returns the token's session id when it is a relay token (and deletes it), else false.
if redis.call('HGET', KEYS[1], 'g') ~= 'relay' then
  return false
end
local s = redis.call('HGET', KEYS[1], 's')
redis.call('DEL', KEYS[1])
return s
