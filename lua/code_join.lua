-- code_join: a join through the public session id with its code, checked and joined in one
-- atomic step (one round trip). `code_check` and `join` are lua/code_check.lua and
-- lua/join.lua, prepended as local functions by src/engine/redis/scripts.rs, so each rule has
-- one source.
-- KEYS[1]  session hash            {S}:session  (code_check's KEYS[1], join's KEYS[4])
-- KEYS[2]  failures, everywhere    {S}:codefail
-- KEYS[3]  failures, this client   {S}:codefail@<address>
-- KEYS[4]  members hash            {S}:peers
-- KEYS[5]  join counter            {S}:seq
-- KEYS[6]  server peer string      {S}:server
-- KEYS[7]  the session's tokens    {S}:tokens
-- ARGV[1..5]   code_check's ARGV (HMAC of the code, window, limits, nonce)
-- ARGV[6..11]  join's ARGV (peer id, owner, blob, ttl, role, max members)
-- Returns code_check's reply when the code is not accepted or the session is a relay one
-- ({'correct', created_at, '1'}: a relay session has no signaling room, nothing joined),
-- else code_check's reply followed by join's.
local check = code_check({KEYS[1], KEYS[2], KEYS[3]},
  {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]})
if check[1] ~= 'correct' or check[3] == '1' then
  return check
end
local joined = join({KEYS[4], KEYS[5], KEYS[6], KEYS[1], KEYS[7]},
  {ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]})
for i = 1, #joined do
  check[#check + 1] = joined[i]
end
return check
