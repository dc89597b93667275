-- relay_forget: takes a relay socket off its session's waiting lists (paired, or gave up).
-- KEYS[1]  fresh host sockets waiting    {S}:relay:hosts    (ms|owner|socket)
-- KEYS[2]  joiner sockets waiting        {S}:relay:joiners  (ms|owner|socket)
-- KEYS[3]  late host sockets held        {S}:relay:late     (ms|owner|socket)
-- ARGV[1]  the socket, owner|socket
-- Returns how many entries went (the lists are short, `--relay-max-waiting` at most).
local gone = 0
for _, key in ipairs(KEYS) do
  for _, e in ipairs(redis.call('LRANGE', key, 0, -1)) do
    if string.match(e, '^%d+|(.*)$') == ARGV[1] then
      gone = gone + redis.call('LREM', key, 0, e)
    end
  end
end
return gone
