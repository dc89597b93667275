-- relay_unmark: takes back a mark whose host socket turned out not to be the host's acceptor
-- (it failed the approval check), so a reconnect socket cannot hold the fresh window open.
-- KEYS[1]  the last host event (ms)      {S}:relay:mark
-- ARGV[1]  the mark to take back (as relay_mark returned it)
-- ARGV[2]  the mark before it (0: none)
-- ARGV[3]  ttl (ms)
-- Returns 1 when taken back, 0 when a later mark was set meanwhile (it stays).
if tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[1]) then
  return 0
end
if tonumber(ARGV[2]) == 0 then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
