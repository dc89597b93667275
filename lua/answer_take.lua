-- answer_take: takes the answer of one handshake; of concurrent readers exactly one gets it.
-- KEYS[1]  answer string           {S}:answer:<to>:<handshake>
-- Returns {} when there is none, else {"<from>|<payload>"} (see answer_put.lua).
local v = redis.call('GET', KEYS[1])
if not v then
  return {}
end
redis.call('DEL', KEYS[1])
return {v}
