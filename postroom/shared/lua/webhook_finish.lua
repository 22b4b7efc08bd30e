-- postroom worker: the end of one delivery attempt of one event to one endpoint, in one
-- step (postroom/worker/webhooks.py): the event delivered, given up, or due again later; the attempt
-- in the delivery log; the endpoint's failing streak, and its disabling after a long one.
--
-- KEYS[1]  the solution's webhook endpoints, a hash id -> JSON record  (keys.webhooks(sid))
-- KEYS[2]  the endpoint's due events, a sorted set           (keys.webhook_due(sid, id))
-- KEYS[3]  the endpoint's pending events, a hash          (keys.webhook_pending(sid, id))
-- KEYS[4]  the endpoint's delivery log, a list                 (keys.webhook_log(sid, id))
-- ARGV[1]  the endpoint id         ARGV[2]  the event id        ARGV[3]  now, Unix seconds
-- ARGV[4]  "delivered", "retry" or "give_up"
-- ARGV[5]  with "retry": when to try again, Unix seconds
-- ARGV[6]  the attempt just made (1, 2, ...)
-- ARGV[7]  the log entry, JSON     ARGV[8]  the log's length
-- ARGV[9]  seconds of failing deliveries after which the endpoint is disabled
--
-- Returns 1, or 0 when the event was not pending any more (another worker finished it
-- after this one's lease ended): then nothing is written.

local pending = redis.call("HGET", KEYS[3], ARGV[2])
if not pending then
  return 0
end
local now = tonumber(ARGV[3])
if ARGV[4] == "retry" then
  local entry = cjson.decode(pending)
  entry["attempt"] = tonumber(ARGV[6])
  redis.call("HSET", KEYS[3], ARGV[2], cjson.encode(entry))
  redis.call("ZADD", KEYS[2], ARGV[5], ARGV[2])
else
  redis.call("HDEL", KEYS[3], ARGV[2])
  redis.call("ZREM", KEYS[2], ARGV[2])
end
redis.call("LPUSH", KEYS[4], ARGV[7])
redis.call("LTRIM", KEYS[4], 0, tonumber(ARGV[8]) - 1)

local raw = redis.call("HGET", KEYS[1], ARGV[1])
if raw then
  local record = cjson.decode(raw)
  local since = record["failing_since"]
  local changed = false
  if ARGV[4] == "delivered" then
    if since ~= nil and since ~= cjson.null then
      record["failing_since"] = cjson.null
      changed = true
    end
  elseif since == nil or since == cjson.null then
    record["failing_since"] = now
    changed = true
  elseif record["enabled"] and now - tonumber(since) >= tonumber(ARGV[9]) then
    record["enabled"] = false
    record["disabled_at"] = now
    record["disabled_reason"] = "failing"
    changed = true
  end
  if changed then
    redis.call("HSET", KEYS[1], ARGV[1], cjson.encode(record))
  end
end
return 1
