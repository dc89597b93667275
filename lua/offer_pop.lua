-- offer_pop: takes the oldest unexpired offer of one recipient (each delivered once).
-- KEYS[1]  offer list              {S}:offers:<peer>
-- ARGV[1]  mailbox ttl (ms): entries older than this are dropped on the way
-- Returns {} when nothing is queued, else {payload}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
while true do
  local entry = redis.call('LPOP', KEYS[1])
  if not entry then
    return {}
  end
  local sep = string.find(entry, '|', 1, true)
  local ts = tonumber(string.sub(entry, 1, sep - 1))
  if ts + ttl > now then
    return {string.sub(entry, sep + 1)}
  end
end
