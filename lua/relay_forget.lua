-- relay_forget: takes a relay socket off its session's waiting lists (paired, or gave up).
-- KEYS[1]  fresh host sockets waiting    {S}:relay:hosts
-- KEYS[2]  joiner sockets waiting        {S}:relay:joiners
-- ARGV[1]  the socket, owner|socket
-- Returns how many entries went.
return redis.call('LREM', KEYS[1], 0, ARGV[1]) + redis.call('LREM', KEYS[2], 0, ARGV[1])
