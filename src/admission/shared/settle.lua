-- The end of one request's hold on a node, on its client, or on both: the
-- lease ends, the window entry is corrected, and waiting replicas hear
-- that capacity may be free (when a node's hold ended).
--
-- KEYS[1]: the node's key prefix ("" for none); KEYS[2]: the client's ("" for none).
-- ARGV: the node's reservation id and slot, the tokens reserved on the
--       node, reserved bytes, how it ended ("settle": corrected to the
--       tokens used; "cancel": nothing reached the node, all is returned;
--       "keep": counted in full), tokens used, response bytes, the channel
--       to publish on, the node's name, the client's reservation id and
--       slot (a retried request keeps its client's hold from its first
--       attempt), the tokens reserved on the client, the tokens the
--       node's settlement counts (at least its reservation where the node
--       charges at arrival).
-- An entry whose slot has left the window is not touched.

local reserved_b = tonumber(ARGV[4])
local ending, used_t, response_b = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])

local function adjust(p, slot, l, delta)
  if delta == 0 then return end
  local have = tonumber(redis.call('HGET', p .. ':amt', l .. ':' .. slot) or '0')
  if have + delta < 0 then delta = -have end
  redis.call('HINCRBY', p .. ':amt', l .. ':' .. slot, delta)
  redis.call('HINCRBY', p .. ':amt', l, delta)
end

local function finish(p, rid, slot, reserved_t, used, with_bytes)
  redis.call('ZREM', p .. ':fly', rid)
  if not redis.call('ZSCORE', p .. ':slots', slot) then return end
  if ending == 'cancel' then
    adjust(p, slot, 'r', -1)
    adjust(p, slot, 't', -reserved_t)
    if with_bytes then adjust(p, slot, 'b', -reserved_b) end
  elseif ending == 'settle' then
    adjust(p, slot, 't', used - reserved_t)
  end
  if with_bytes and ending ~= 'cancel' then adjust(p, slot, 'b', response_b) end
end

if KEYS[1] ~= '' then
  finish(KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[13]), true)
  redis.call('PUBLISH', ARGV[8], ARGV[9])
end
if KEYS[2] ~= '' then finish(KEYS[2], ARGV[10], ARGV[11], tonumber(ARGV[12]), used_t, false) end
return 1
