-- relay_arrive: a relay socket of a session looks for its partner, or waits (src/relay).
-- KEYS[1]  fresh host sockets waiting    {S}:relay:hosts    (list of owner|socket, oldest first)
-- KEYS[2]  joiner sockets waiting        {S}:relay:joiners  (list of owner|socket, oldest first)
-- KEYS[3]  the last host event (ms)      {S}:relay:mark
-- ARGV[1]  side: 'host' or 'joiner'
-- ARGV[2]  the arriving socket, owner|socket
-- ARGV[3]  fresh window (ms): a host socket later than this after the mark is late
-- ARGV[4]  sockets one list may hold at most
-- ARGV[5]  ttl (ms) of the lists
-- Returns {'paired', owner|socket} (taken off the other list), {'queued'}, {'late'} (a host
-- socket that is not fresh: never listed) or {'crowded'}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local theirs, mine = KEYS[1], KEYS[2]
if ARGV[1] == 'host' then
  local mark = tonumber(redis.call('GET', KEYS[3]) or '0')
  if now - mark > tonumber(ARGV[3]) then
    return {'late'}
  end
  theirs, mine = KEYS[2], KEYS[1]
end
local other = redis.call('LPOP', theirs)
if other then
  return {'paired', other}
end
if redis.call('LLEN', mine) >= tonumber(ARGV[4]) then
  return {'crowded'}
end
redis.call('RPUSH', mine, ARGV[2])
redis.call('PEXPIRE', mine, ARGV[5])
return {'queued'}
