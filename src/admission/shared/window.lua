-- The shared window of one limited thing, as every script sees it (this
-- file is put in front of admit.lua and peek.lua).
--
-- A thing under key prefix p keeps a window of 100 ms slots (<p>:slots, a
-- sorted set of slot numbers; <p>:amt, a hash of "r:<slot>", "t:<slot>",
-- "b:<slot>" and the totals "r", "t", "b"), its requests in flight as
-- leases that expire (<p>:fly, reservation id -> expiry ms) and a cooldown
-- (<p>:cool, ms). An amount stays counted for 605 slots (60.5 s: the
-- minute and the guard band of src/limits). Time is Redis's own.

local SLOT_MS = 100
local SLOTS = 605

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local slot = math.floor(now / SLOT_MS)

-- Drops the slots that have left the window, and expired leases.
local function advance(p)
  local old = redis.call('ZRANGEBYSCORE', p .. ':slots', '-inf', slot - SLOTS)
  for _, s in ipairs(old) do
    for _, l in ipairs({'r', 't', 'b'}) do
      local v = tonumber(redis.call('HGET', p .. ':amt', l .. ':' .. s) or '0')
      if v ~= 0 then redis.call('HINCRBY', p .. ':amt', l, -v) end
      redis.call('HDEL', p .. ':amt', l .. ':' .. s)
    end
  end
  if #old > 0 then redis.call('ZREMRANGEBYSCORE', p .. ':slots', '-inf', slot - SLOTS) end
  redis.call('ZREMRANGEBYSCORE', p .. ':fly', '-inf', now)
end

local function total(p, l)
  return tonumber(redis.call('HGET', p .. ':amt', l) or '0')
end

-- When enough of limit l leaves the window to free `need`.
local function freed_at(p, l, need)
  local slots = redis.call('ZRANGE', p .. ':slots', 0, -1)
  local sum = 0
  for _, s in ipairs(slots) do
    sum = sum + tonumber(redis.call('HGET', p .. ':amt', l .. ':' .. s) or '0')
    if sum >= need then return (tonumber(s) + SLOTS) * SLOT_MS end
  end
  return now + 60000
end


-- With a node window below the minute (Azure counts over 10 s): when the
-- newest span_ms (plus a 100 ms guard, as src/limits) has room for `want`
-- of limit l under the per-minute quota q pro rata; 0 when it has now. A
-- demand above the allotment fits an empty span.
local function short_wait(p, l, q, want, span_ms)
  local len = math.floor(span_ms / SLOT_MS) + 2
  local allot = math.max(1, math.floor(q * span_ms / 60000))
  local slots = redis.call('ZRANGEBYSCORE', p .. ':slots', slot - len + 1, '+inf')
  if #slots == 0 then return 0 end
  local fields = {}
  for i, s in ipairs(slots) do fields[i] = l .. ':' .. s end
  local amounts = redis.call('HMGET', p .. ':amt', unpack(fields))
  local used = 0
  for i = 1, #slots do used = used + tonumber(amounts[i] or '0') end
  if used == 0 or used + want <= allot then return 0 end
  local need = math.min(used + want - allot, used)
  local sum = 0
  for i, s in ipairs(slots) do
    sum = sum + tonumber(amounts[i] or '0')
    if sum >= need then return (tonumber(s) + len) * SLOT_MS end
  end
  return (slot + len) * SLOT_MS
end
