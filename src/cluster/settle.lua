-- The end of one request: its lease ends, its window entry is corrected,
-- and waiting replicas hear that capacity may be free.
--
-- KEYS[1]: the node's key prefix; KEYS[2]: the client's ("" for none).
-- ARGV: reservation id, slot, reserved tokens, reserved bytes, how it
--       ended ("settle": corrected to the tokens used; "cancel": nothing
--       reached the node, all is returned; "keep": counted in full), tokens
--       used, response bytes, the channel to publish on, the node's name.
-- An entry whose slot has left the window is not touched.

local rid, slot = ARGV[1], ARGV[2]
local reserved_t, reserved_b = tonumber(ARGV[3]), tonumber(ARGV[4])
local ending, used_t, response_b = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])

local function adjust(p, l, delta)
  if delta == 0 then return end
  local have = tonumber(redis.call('HGET', p .. ':amt', l .. ':' .. slot) or '0')
  if have + delta < 0 then delta = -have end
  redis.call('HINCRBY', p .. ':amt', l .. ':' .. slot, delta)
  redis.call('HINCRBY', p .. ':amt', l, delta)
end

local function finish(p, with_bytes)
  redis.call('ZREM', p .. ':fly', rid)
  if not redis.call('ZSCORE', p .. ':slots', slot) then return end
  if ending == 'cancel' then
    adjust(p, 'r', -1)
    adjust(p, 't', -reserved_t)
    if with_bytes then adjust(p, 'b', -reserved_b) end
  elseif ending == 'settle' then
    adjust(p, 't', used_t - reserved_t)
  end
  if with_bytes and ending ~= 'cancel' then adjust(p, 'b', response_b) end
end

finish(KEYS[1], true)
if KEYS[2] ~= '' then finish(KEYS[2], false) end
redis.call('PUBLISH', ARGV[8], ARGV[9])
return 1
