-- Admission for one request, atomically across every replica.
--
-- KEYS[1]: the client's key prefix ("" when the request has no client
--          limits); KEYS[2..]: each candidate node's key prefix.
-- ARGV: demand tokens (the client's), demand bytes, reservation id,
--       lease ms, rotation, client rpm, client tpm, client burst, client
--       rate per second, client max concurrency (0 = none; its requests
--       in flight are <client>:fly), then per candidate: rpm, tpm, bpm, max
--       concurrency (0 = none), the tokens the request reserves there (a
--       node's own default completion), its window in ms (60000: the
--       minute alone).
--
-- The window of each thing is window.lua's (put in front of this file); a
-- client also has a token bucket (<p>:bucket).
--
-- Returns {kind, a, now_ms, slot}:
--   0: placed on candidate a (1-based)
--   1: wait: nothing has headroom; a = when a window frees enough (ms,
--      Redis time), 0 when only a release can help
--   2: never: the request alone exceeds a limit of every candidate; a = 1
--      rpm, 2 tpm, 3 bpm
--   3: the client is over its limit; a = retry after (ms), 0 when one of
--      its requests in flight must end first
--   4: the request alone exceeds the client's limit; a = 1 rpm, 2 tpm

local tokens = tonumber(ARGV[1])
local bytes = tonumber(ARGV[2])
local rid = ARGV[3]
local lease = tonumber(ARGV[4])
local rotation = tonumber(ARGV[5])

-- 'now', or 'never' with the limit, or 'at' with a time, or 'release'.
local function outlook(p, limits, want, span_ms)
  local cool = tonumber(redis.call('GET', p .. ':cool') or '0')
  local at = 0
  if cool > now then at = cool end
  for i, l in ipairs({'r', 't', 'b'}) do
    local q = limits[i]
    if q > 0 then
      if want[i] > q then return 'never', i end
      local used = total(p, l)
      if used + want[i] > q then
        local when = freed_at(p, l, used + want[i] - q)
        if when > at then at = when end
      end
      if span_ms > 0 and span_ms < 60000 then
        local when = short_wait(p, l, q, want[i], span_ms)
        if when > at then at = when end
      end
    end
  end
  if at > 0 then return 'at', at end
  if limits[4] > 0 and redis.call('ZCARD', p .. ':fly') >= limits[4] then
    return 'release', 0
  end
  return 'now', 0
end

local function record(p, r, tk, b)
  redis.call('ZADD', p .. ':slots', slot, slot)
  for l, v in pairs({r = r, t = tk, b = b}) do
    if v ~= 0 then
      redis.call('HINCRBY', p .. ':amt', l .. ':' .. slot, v)
      redis.call('HINCRBY', p .. ':amt', l, v)
    end
  end
  redis.call('ZADD', p .. ':fly', now + lease, rid)
  -- Nothing lingers once a minute passes without traffic.
  for _, k in ipairs({':slots', ':amt', ':fly'}) do
    redis.call('PEXPIRE', p .. k, 120000 + lease)
  end
end

-- The client first: a request it may not make takes nothing from a node.
local client = KEYS[1]
local bucket_tokens = nil
if client ~= '' then
  advance(client)
  local c_limits = {tonumber(ARGV[6]), tonumber(ARGV[7]), 0, tonumber(ARGV[10])}
  local kind, a = outlook(client, c_limits, {1, tokens, 0}, 0)
  if kind == 'never' then return {4, a, now, slot} end
  if kind == 'at' then return {3, math.max(1, a - now), now, slot} end
  if kind == 'release' then return {3, 0, now, slot} end
  local burst = tonumber(ARGV[8])
  if burst > 0 then
    local rate = tonumber(ARGV[9])
    local b = redis.call('HMGET', client .. ':bucket', 'tokens', 'at')
    local have = tonumber(b[1] or burst)
    local since = tonumber(b[2] or now)
    have = math.min(burst, have + (now - since) * rate / 1000)
    if have < 1 then return {3, math.ceil((1 - have) * 1000 / rate), now, slot} end
    bucket_tokens = have - 1
  end
end

local best, best_load, best_fly, best_turn, best_tokens = nil, nil, nil, nil, nil
local earliest, on_release, never = nil, false, nil
local n = #KEYS - 1
for i = 1, n do
  local p = KEYS[i + 1]
  advance(p)
  local base = 10 + (i - 1) * 6
  local limits = {tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]),
                  tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])}
  local here = tonumber(ARGV[base + 5])
  local kind, a = outlook(p, limits, {1, here, bytes}, tonumber(ARGV[base + 6]))
  if kind == 'now' then
    local fly = redis.call('ZCARD', p .. ':fly')
    local load = 0
    local used = {total(p, 'r') + 0, total(p, 't'), total(p, 'b')}
    for j = 1, 3 do
      if limits[j] > 0 then load = math.max(load, math.floor(used[j] * 1000000 / limits[j])) end
    end
    if limits[4] > 0 then load = math.max(load, math.floor(fly * 1000000 / limits[4])) end
    local turn = (i - 1 + n - (rotation % n)) % n
    if best == nil or load < best_load or (load == best_load and (fly < best_fly
        or (fly == best_fly and turn < best_turn))) then
      best, best_load, best_fly, best_turn, best_tokens = i, load, fly, turn, here
    end
  elseif kind == 'at' then
    if earliest == nil or a < earliest then earliest = a end
  elseif kind == 'release' then
    on_release = true
  else
    never = never or a
  end
end

if best == nil then
  if earliest ~= nil then return {1, earliest, now, slot} end
  if on_release then return {1, 0, now, slot} end
  return {2, never or 1, now, slot}
end

record(KEYS[best + 1], 1, best_tokens, bytes)
if client ~= '' then
  record(client, 1, tokens, 0)
  if bucket_tokens ~= nil then
    redis.call('HSET', client .. ':bucket', 'tokens', tostring(bucket_tokens), 'at', now)
    redis.call('PEXPIRE', client .. ':bucket', 3600000)
  end
end
return {0, best, now, slot}
