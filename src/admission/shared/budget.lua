-- A client's budget for one period, shared by every replica: what settled
-- requests cost (`spent`) and the worst cases of those in flight (`held`),
-- in nano-dollars, checked and changed in one step.
--
-- KEYS[1]: the budget's key (client and period start); KEYS[1]..':h' holds
-- each hold's amount by id, KEYS[1]..':x' each hold's expiry.
-- ARGV[1]: 'hold', 'end' or 'peek'.
--   hold: budget, worst case, the spend to start from when the key is new
--         (this replica's reading of the store), hold id, hold lifetime
--         (ms), key lifetime (s, 0: none).
--         Answers {0, spent, held} when held, {1, ...} when what is spent
--         leaves too little, {2, ...} when holds in flight do.
--   end:  hold id, what the request cost. A hold that already expired was
--         counted in full when it did (the safe side).
--   peek: answers {0, spent, held}.
-- A hold whose replica died expires and counts as spent in full.

local key = KEYS[1]
local holds, expiries = key .. ':h', key .. ':x'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local gone = redis.call('ZRANGEBYSCORE', expiries, '-inf', now)
for _, id in ipairs(gone) do
  local amount = tonumber(redis.call('HGET', holds, id) or '0')
  redis.call('HINCRBY', key, 'held', -amount)
  redis.call('HINCRBY', key, 'spent', amount)
  redis.call('HDEL', holds, id)
  redis.call('ZREM', expiries, id)
end

local op = ARGV[1]
if op == 'hold' then
  local budget, worst = tonumber(ARGV[2]), tonumber(ARGV[3])
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'spent', ARGV[4], 'held', 0)
  end
  local ttl = tonumber(ARGV[7])
  if ttl > 0 then
    redis.call('EXPIRE', key, ttl)
  end
  local spent = tonumber(redis.call('HGET', key, 'spent'))
  local held = tonumber(redis.call('HGET', key, 'held'))
  if spent + worst > budget then return {1, spent, held} end
  if spent + held + worst > budget then return {2, spent, held} end
  redis.call('HINCRBY', key, 'held', worst)
  redis.call('HSET', holds, ARGV[5], worst)
  redis.call('ZADD', expiries, now + tonumber(ARGV[6]), ARGV[5])
  if ttl > 0 then
    redis.call('EXPIRE', holds, ttl)
    redis.call('EXPIRE', expiries, ttl)
  end
  return {0, spent, held + worst}
elseif op == 'end' then
  local amount = redis.call('HGET', holds, ARGV[2])
  if amount then
    redis.call('HINCRBY', key, 'held', -tonumber(amount))
    redis.call('HINCRBY', key, 'spent', tonumber(ARGV[3]))
    redis.call('HDEL', holds, ARGV[2])
    redis.call('ZREM', expiries, ARGV[2])
  end
end
return {0, tonumber(redis.call('HGET', key, 'spent') or '0'), tonumber(redis.call('HGET', key, 'held') or '0')}
