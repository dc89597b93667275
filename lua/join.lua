-- join: adds a peer to a room with its role, unless the room is full. The role comes from the
-- id the peer joined through (the host's token: server); a server becomes the room's server.
-- A repeated join of a member changes nothing and returns fresh = 0.
-- KEYS[1]  members hash            {S}:peers   (peer -> "seq|role|joined_at|owner|blob")
-- KEYS[2]  join counter            {S}:seq     (orders members by join)
-- KEYS[3]  server peer string      {S}:server
-- KEYS[4]  session hash            {S}:session (ttl refreshed; a tombstone of close.lua refuses)
-- KEYS[5]  the session's tokens    {S}:tokens  (ttl refreshed; the caller refreshes each token)
-- ARGV[1]  peer id
-- ARGV[2]  owner instance id
-- ARGV[3]  blob: JSON of the peer's transports and metadata, opaque here
-- ARGV[4]  session ttl (ms)
-- ARGV[5]  role: 'server' or 'client'
-- ARGV[6]  members a room holds at most
-- Returns {'closed'} when the session was closed (close.lua) after the caller resolved it,
-- {'full'} when the room is full, else {fresh ('1'|'0'), n, token1..tokenN, id1, rec1, id2,
-- rec2, ...}: the session's tokens when this join made the room's first member (the caller
-- renews them: other slots), then every member, the joiner included.
if redis.call('HEXISTS', KEYS[4], 'closed_at') == 1 then
  return {'closed'}
end
local fresh = 0
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[6]) then
    return {'full'}
  end
  fresh = 1
  local role = ARGV[5]
  if role == 'server' then
    redis.call('SET', KEYS[3], ARGV[1])
  end
  local seq = redis.call('INCR', KEYS[2])
  local now = redis.call('TIME')[1]
  redis.call('HSET', KEYS[1], ARGV[1],
    seq .. '|' .. role .. '|' .. now .. '|' .. ARGV[2] .. '|' .. ARGV[3])
end
for i = 1, 5 do
  redis.call('PEXPIRE', KEYS[i], ARGV[4])
end
local all = redis.call('HGETALL', KEYS[1])
local tokens = {}
if fresh == 1 and #all == 2 then
  tokens = redis.call('SMEMBERS', KEYS[5])
end
local out = {tostring(fresh), tostring(#tokens)}
for i = 1, #tokens do
  out[#out + 1] = tokens[i]
end
for i = 1, #all do
  out[#out + 1] = all[i]
end
return out
