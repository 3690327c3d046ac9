-- A node rests after an upstream 429, for every replica: KEYS[1] is the
-- node's cooldown key, ARGV[1] the rest in ms. A later call extends the
-- rest, never shortens it.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rest = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if now + rest > current then
  redis.call('SET', KEYS[1], now + rest, 'PX', rest)
end
return 1
