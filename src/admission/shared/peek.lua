-- What each node has used in the shared window now, for /status (after
-- window.lua). KEYS: the nodes' key prefixes. Returns, per node, requests,
-- tokens, bytes and requests in flight.
local out = {}
for i = 1, #KEYS do
  local p = KEYS[i]
  advance(p)
  out[#out + 1] = total(p, 'r')
  out[#out + 1] = total(p, 't')
  out[#out + 1] = total(p, 'b')
  out[#out + 1] = redis.call('ZCARD', p .. ':fly')
end
return out
