-- postroom hLimit token bucket: peek at, take, or reserve one token of one or two buckets.
--
-- KEYS[1]  the solution's bucket, a hash {tokens, ts, cap, since}   (keys.bucket(sid))
-- KEYS[2]  the request's bucket, same shape; given when ARGV[3] >= 0, used only when
--          ARGV[3] is below ARGV[2]                                (keys.request_bucket(sid, cap))
-- KEYS[n]  the message's ledger hash, last key; only when ARGV[5] == "1"  (keys.ledger(sid, id))
--
-- ARGV[1]  period P in seconds (float): a bucket of capacity C refills C tokens per P
-- ARGV[2]  the solution's capacity (integer >= 0)
-- ARGV[3]  the request's capacity (integer >= 0), or -1 when the request names none
-- ARGV[4]  "peek" (compute only, write nothing), "take", or "reserve" (take; when no token
--          is free, hold the next one in line for this message: needs the ledger)
-- ARGV[5]  "1" when a ledger key is given (take once per message, see below)
-- ARGV[6]  reserve only: the longest wait, in microseconds, for which a slot may be held
-- ARGV[7]  optional, with a ledger: the number N of the attempt about to talk SMTP, or "0".
--          When the take is allowed, the ledger then records it (`sending` and `attempts`
--          set to N) in the same step; a refused take records nothing.
-- ARGV[8]  optional, with ARGV[7]: the ledger's time to live in seconds ("0": leave it)
--
-- Returns {allowed (0|1), remaining, limit, retry_after_us, reset_after_us, reserved (0|1)}
-- for the tighter bucket (the one with the fewest whole tokens left); retry_after_us is -1
-- for "never" (a capacity of 0). The microsecond values are strings (Lua numbers would be
-- truncated). reserved = 1: a later slot is held for this message; retry_after is its wait.
--
-- State: tokens is a float, ts the Redis TIME of the last write in microseconds, cap the
-- capacity it was written with, since the time from which the bucket vouches for the
-- reservations held against it. A missing key is a full bucket; each written key expires
-- about when it would be full again.
--
-- A capacity change keeps what was used (cap - tokens): a larger capacity adds the
-- difference at once, a smaller one takes it away at once (never below empty). A smaller
-- capacity also voids every reservation held against the bucket (their debts are dropped
-- and the messages take again under the new capacity); a larger one keeps them.
--
-- Ledger fields: `token` (set: the message has paid its token; every later take is allowed
-- and takes nothing), `token_due` and `token_at` (a reservation: the time its slot comes,
-- and the time it was made). A take at or after token_due redeems the reservation (sets
-- `token`); before it, it is refused with the time left. A reservation made before a bucket's
-- `since` (the bucket was recreated or its capacity lowered) is void. With ARGV[7], an allowed
-- take also sets `sending` and `attempts` (see worker/ledger.py), so the worker marks the
-- attempt it is about to make in the step that lets it make it.

-- Older Redis needs effects replication before a writing script may call TIME; Redis 7
-- keeps the function as a no-op and some emulators lack it, hence the guard.
if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local period_us = tonumber(ARGV[1]) * 1000000
local mode = ARGV[4]
local writes = mode ~= "peek"
local has_ledger = ARGV[5] == "1"
local max_wait_us = tonumber(ARGV[6] or "0") or 0
local attempt = tonumber(ARGV[7] or "0") or 0
local ledger_ttl_s = tonumber(ARGV[8] or "0") or 0
local EPSILON = 1e-9 -- float slack, so a caller who waits retry_after is not refused
local TTL_SLACK_MS = 1000

local t = redis.call("TIME")
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])

local buckets = { { key = KEYS[1], cap = tonumber(ARGV[2]) } }
-- the request-hLimit rule, here alone: a request's capacity at or above the solution's
-- names no second bucket (it cannot tighten)
local request_cap = tonumber(ARGV[3])
if request_cap >= 0 and request_cap < buckets[1].cap then
  buckets[2] = { key = KEYS[2], cap = request_cap }
end
local ledger = has_ledger and KEYS[#KEYS] or nil

-- Capacity 0 anywhere: never allowed, nothing read or written (even a paid message).
for _, b in ipairs(buckets) do
  if b.cap <= 0 then
    return { 0, 0, 0, "-1", "0", 0 }
  end
end

for _, b in ipairs(buckets) do
  local state = redis.call("HMGET", b.key, "tokens", "ts", "cap", "since")
  local tokens = tonumber(state[1])
  local ts = tonumber(state[2])
  if tokens == nil or ts == nil then
    b.tokens = b.cap
    b.since = now_us
  else
    local old = tonumber(state[3]) or b.cap
    b.since = tonumber(state[4]) or 0
    local elapsed = math.max(0, now_us - ts)
    tokens = math.min(old, tokens + elapsed * old / period_us)
    if b.cap > old then
      tokens = tokens + (b.cap - old)
    elseif b.cap < old then
      tokens = math.max(0, math.max(0, tokens) - (old - b.cap))
      b.since = now_us
    end
    b.tokens = tokens
  end
end

local function save()
  for _, b in ipairs(buckets) do
    local ttl_ms = math.ceil((b.cap - b.tokens) * period_us / b.cap / 1000) + TTL_SLACK_MS
    redis.call("HSET", b.key, "tokens", string.format("%.17g", b.tokens),
      "ts", string.format("%d", now_us), "cap", b.cap, "since", string.format("%d", b.since))
    redis.call("PEXPIRE", b.key, ttl_ms)
  end
end

local function answer(allowed, retry_us, reserved)
  local tight = buckets[1]
  for _, b in ipairs(buckets) do
    local whole, tight_whole = math.floor(b.tokens + EPSILON), math.floor(tight.tokens + EPSILON)
    if whole < tight_whole or (whole == tight_whole and b.cap < tight.cap) then
      tight = b
    end
  end
  local remaining = math.max(0, math.floor(tight.tokens + EPSILON))
  local reset_us = math.max(0, math.ceil((tight.cap - tight.tokens) * period_us / tight.cap))
  return {
    allowed and 1 or 0,
    remaining,
    tight.cap,
    string.format("%d", retry_us),
    string.format("%d", reset_us),
    reserved and 1 or 0,
  }
end

-- an allowed take: the ledger says the message has paid (when `token` is true) and, when
-- asked (ARGV[7]), that attempt N is under way
local function paid(token)
  if not (writes and has_ledger) then
    return
  end
  local fields = {}
  if token then
    fields = { "token", 1 }
  end
  if attempt > 0 then
    table.insert(fields, "sending")
    table.insert(fields, attempt)
    table.insert(fields, "attempts")
    table.insert(fields, attempt)
  end
  if #fields > 0 then
    redis.call("HSET", ledger, unpack(fields))
  end
  if attempt > 0 and ledger_ttl_s > 0 then
    redis.call("EXPIRE", ledger, ledger_ttl_s)
  end
end

if has_ledger then
  local held = redis.call("HMGET", ledger, "token", "token_due", "token_at")
  if held[1] then
    paid(false)
    return answer(true, 0, false) -- paid before: allowed, takes nothing
  end
  local due, at = tonumber(held[2]), tonumber(held[3])
  if due ~= nil and at ~= nil then
    local valid = true
    for _, b in ipairs(buckets) do
      if at < b.since then
        valid = false
      end
    end
    if valid and now_us >= due then
      if writes then
        paid(true)
        redis.call("HDEL", ledger, "token_due", "token_at")
      end
      return answer(true, 0, false)
    elseif valid then
      return answer(false, due - now_us, true)
    elseif writes then
      redis.call("HDEL", ledger, "token_due", "token_at")
    end
  end
end

local allowed = true
local wait_us = 0
for _, b in ipairs(buckets) do
  if b.tokens < 1 - EPSILON then
    allowed = false
    wait_us = math.max(wait_us, math.ceil((1 - b.tokens) * period_us / b.cap))
  end
end

if allowed then
  if writes then
    for _, b in ipairs(buckets) do
      b.tokens = math.max(0, b.tokens - 1)
    end
    save()
    paid(true)
  end
  return answer(true, 0, false)
end

if mode == "reserve" and has_ledger and wait_us <= max_wait_us then
  -- the next slot in line: the bucket goes into debt, later reservations queue behind
  for _, b in ipairs(buckets) do
    b.tokens = b.tokens - 1
  end
  save()
  redis.call("HSET", ledger, "token_due", string.format("%d", now_us + wait_us),
    "token_at", string.format("%d", now_us))
  return answer(false, wait_us, true)
end

return answer(false, wait_us, false)
