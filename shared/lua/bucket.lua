-- postroom hLimit token bucket: take (or peek at) one token from one or two buckets at once.
--
-- KEYS[1]  the solution's bucket, a hash {tokens, ts}             (keys.bucket(sid))
-- KEYS[2]  the request's bucket, a hash {tokens, ts}; only when ARGV[3] >= 0
--                                                                  (keys.request_bucket(sid, cap))
-- KEYS[n]  the message's ledger hash, last key; only when ARGV[5] == "1"  (keys.ledger(sid, id))
--
-- ARGV[1]  period P in seconds (float): a bucket of capacity C refills C tokens per P
-- ARGV[2]  the solution's capacity (integer >= 0)
-- ARGV[3]  the request's capacity (integer >= 0), or -1 when the request names no bucket
-- ARGV[4]  "1" take, "0" peek (compute only, write nothing)
-- ARGV[5]  "1" when a ledger key is given: if its field `token` is set the take answers
--          allowed and takes nothing; a successful take sets it to 1 (its TTL is the caller's)
--
-- Returns {allowed (0|1), remaining, limit, retry_after_us, reset_after_us} for the tighter
-- bucket (the one with the fewest whole tokens left); retry_after_us is -1 for "never"
-- (a capacity of 0). The microsecond values are strings (Lua numbers would be truncated).
--
-- State: tokens is a float, ts the Redis TIME of the last write in microseconds. A missing
-- key is a full bucket; each written key expires about when it would be full again.
-- The refill uses the capacity given now: a smaller capacity clamps the tokens at once,
-- a larger one keeps the stored tokens and refills them at the new rate.

-- Older Redis needs effects replication before a writing script may call TIME; Redis 7
-- keeps the function as a no-op and some emulators lack it, hence the guard.
if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local period_us = tonumber(ARGV[1]) * 1000000
local take = ARGV[4] == "1"
local has_ledger = ARGV[5] == "1"
local EPSILON = 1e-9 -- float slack, so a caller who waits retry_after is not refused
local TTL_SLACK_MS = 1000

local t = redis.call("TIME")
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])

local buckets = { { key = KEYS[1], cap = tonumber(ARGV[2]) } }
if tonumber(ARGV[3]) >= 0 then
  buckets[2] = { key = KEYS[2], cap = tonumber(ARGV[3]) }
end
local ledger = has_ledger and KEYS[#KEYS] or nil

-- Capacity 0 anywhere: never allowed, nothing read or written.
for _, b in ipairs(buckets) do
  if b.cap <= 0 then
    return { 0, 0, 0, "-1", "0" }
  end
end

for _, b in ipairs(buckets) do
  local state = redis.call("HMGET", b.key, "tokens", "ts")
  local tokens = tonumber(state[1])
  local ts = tonumber(state[2])
  if tokens == nil or ts == nil then
    b.tokens = b.cap
  else
    local elapsed = math.max(0, now_us - ts)
    b.tokens = math.min(b.cap, tokens + elapsed * b.cap / period_us)
  end
end

local paid = has_ledger and redis.call("HEXISTS", ledger, "token") == 1
local allowed = true
for _, b in ipairs(buckets) do
  if b.tokens < 1 - EPSILON then
    allowed = false
  end
end

local spend = take and allowed and not paid
if spend then
  for _, b in ipairs(buckets) do
    b.tokens = math.max(0, b.tokens - 1)
    local ttl_ms = math.ceil((b.cap - b.tokens) * period_us / b.cap / 1000) + TTL_SLACK_MS
    redis.call("HSET", b.key, "tokens", string.format("%.17g", b.tokens), "ts",
      string.format("%d", now_us))
    redis.call("PEXPIRE", b.key, ttl_ms)
  end
  if has_ledger then
    redis.call("HSET", ledger, "token", 1)
  end
end

local retry_us = 0
for _, b in ipairs(buckets) do
  if b.tokens < 1 - EPSILON then
    retry_us = math.max(retry_us, math.ceil((1 - b.tokens) * period_us / b.cap))
  end
end
if allowed or paid then
  retry_us = 0 -- this call found a token (or had paid one before): nothing to wait for
end

local tight = buckets[1]
for _, b in ipairs(buckets) do
  local whole, tight_whole = math.floor(b.tokens + EPSILON), math.floor(tight.tokens + EPSILON)
  if whole < tight_whole or (whole == tight_whole and b.cap < tight.cap) then
    tight = b
  end
end
local remaining = math.floor(tight.tokens + EPSILON)
local reset_us = math.max(0, math.ceil((tight.cap - tight.tokens) * period_us / tight.cap))

return {
  (allowed or paid) and 1 or 0,
  remaining,
  tight.cap,
  string.format("%d", retry_us),
  string.format("%d", reset_us),
}
