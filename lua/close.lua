#!lua flags=allow-oom
-- close: ends a session for good (the Admin API). Its room, code digest, token list and failure
-- counts go; a tombstone (created_at, closed_at and the members it had, as "id|owner;...")
-- stays for the session ttl, so the id cannot be registered again, join.lua refuses joins that
-- resolved the session just before, and a repeated close tells every member's instance again.
-- allow-oom: it frees far more than the tombstone takes.
-- KEYS[1]  session hash            {S}:session (becomes the tombstone)
-- KEYS[2]  the session's tokens    {S}:tokens  (the caller deletes each token in its own slot)
-- KEYS[3]  members hash            {S}:peers
-- KEYS[4]  join counter            {S}:seq
-- KEYS[5]  server peer string      {S}:server
-- KEYS[6]  failures, everywhere    {S}:codefail
-- ARGV[1]  tombstone ttl (ms)
-- Returns {'none'} for an unknown session, else {state ('closed'|'again'), n, token1..tokenN,
-- id1, owner1, id2, owner2, ...}: the tokens, then every member the room had (to disconnect).
-- Offers and answers are not among the session's fixed keys: unreachable now (the mailbox needs
-- a token that resolves), they expire within the mailbox ttl.
local created = redis.call('HGET', KEYS[1], 'created_at')
if not created then
  return {'none'}
end
local state = 'again'
local closed_at = redis.call('HGET', KEYS[1], 'closed_at')
if not closed_at then
  state = 'closed'
  closed_at = redis.call('TIME')[1]
end
local peers = {}
local seen = {}
local function add(id, owner)
  if not seen[id] then
    seen[id] = true
    peers[#peers + 1] = id .. '|' .. owner
  end
end
for entry in string.gmatch(redis.call('HGET', KEYS[1], 'peers') or '', '[^;]+') do
  local id, owner = string.match(entry, '^([^|]*)|(.*)$')
  if id then
    add(id, owner)
  end
end
-- Members that joined after a close cannot exist (join.lua refuses), but would be listed too.
local members = redis.call('HGETALL', KEYS[3])
for i = 1, #members, 2 do
  add(members[i], string.match(members[i + 1], '^[^|]*|[^|]*|[^|]*|([^|]*)|') or '')
end
local tokens = redis.call('SMEMBERS', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('HSET', KEYS[1], 'created_at', created, 'closed_at', closed_at,
  'peers', table.concat(peers, ';'))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
local out = {state, tostring(#tokens)}
for i = 1, #tokens do
  out[#out + 1] = tokens[i]
end
for i = 1, #peers do
  local id, owner = string.match(peers[i], '^([^|]*)|(.*)$')
  out[#out + 1] = id
  out[#out + 1] = owner
end
return out
