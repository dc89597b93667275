-- relay_arrive: a relay socket of a session looks for its partner, or waits (src/relay).
-- KEYS[1]  fresh host sockets waiting    {S}:relay:hosts    (list of ms|owner|socket, oldest first)
-- KEYS[2]  joiner sockets waiting        {S}:relay:joiners  (list of ms|owner|socket, oldest first)
-- KEYS[3]  the last host event (ms)      {S}:relay:mark
-- KEYS[4]  late host sockets held        {S}:relay:late     (list of ms|owner|socket, oldest first)
-- ARGV[1]  side: 'host' or 'joiner'
-- ARGV[2]  the arriving socket, owner|socket
-- ARGV[3]  fresh window (ms)
-- ARGV[4]  sockets one list may hold at most (joiners; late host sockets)
-- ARGV[5]  ttl (ms) of the lists
-- ARGV[6]  age (ms) past which a list entry is stale (its socket went without a word: its
--          instance died, or its client left while it was held)
-- A host socket is fresh (the host's acceptor loop) when it comes within the window after the
-- mark and no fresh one waits already: the acceptor has one socket out at a time, so another
-- is most likely a reconnect for a departed joiner. Late ones wait in their own list: a joiner
-- finding no fresh socket tries the newest late one (the acceptor's socket may have been taken
-- for late), and the approval check tells them apart.
-- Returns {'paired', owner|socket} (taken off its list), {'queued'}, {'late'} (listed as late)
-- or {'crowded'}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stale = now - tonumber(ARGV[6])
local max = tonumber(ARGV[4])

-- Drops stale entries from the head of a list (entries are appended in time order).
local function purge(key)
  while true do
    local head = redis.call('LINDEX', key, 0)
    if not head then return end
    local ms = tonumber(string.match(head, '^(%d+)|'))
    if ms and ms >= stale then return end
    redis.call('LPOP', key)
  end
end

-- Takes the oldest (or, `newest`, the newest) live entry of a list: owner|socket, or nil.
local function take(key, newest)
  purge(key)
  local e
  if newest then e = redis.call('RPOP', key) else e = redis.call('LPOP', key) end
  if not e then return nil end
  return string.match(e, '^%d+|(.*)$')
end

local function push(key)
  redis.call('RPUSH', key, now .. '|' .. ARGV[2])
  redis.call('PEXPIRE', key, ARGV[5])
end

local hosts, joiners, late = KEYS[1], KEYS[2], KEYS[4]
if ARGV[1] == 'host' then
  local mark = tonumber(redis.call('GET', KEYS[3]) or '0')
  purge(hosts)
  if now - mark > tonumber(ARGV[3]) or redis.call('LLEN', hosts) > 0 then
    purge(late)
    if redis.call('LLEN', late) >= max then
      return {'crowded'}
    end
    push(late)
    return {'late'}
  end
  local joiner = take(joiners, false)
  if joiner then
    return {'paired', joiner}
  end
  push(hosts)
  return {'queued'}
end
local host = take(hosts, false) or take(late, true)
if host then
  return {'paired', host}
end
purge(joiners)
if redis.call('LLEN', joiners) >= max then
  return {'crowded'}
end
push(joiners)
return {'queued'}
