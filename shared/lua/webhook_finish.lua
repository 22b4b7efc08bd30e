-- postroom worker: the end of delivery attempts of events to one endpoint, in one step
-- (worker/webhooks.py: the attempts of one batch, in the order they were made): each event
-- delivered, given up, or due again later; each attempt in the delivery log; the
-- endpoint's failing streak, and its disabling after a long one.
--
-- KEYS[1]  the solution's webhook endpoints, a hash id -> JSON record  (keys.webhooks(sid))
-- KEYS[2]  the endpoint's due events, a sorted set           (keys.webhook_due(sid, id))
-- KEYS[3]  the endpoint's pending events, a hash          (keys.webhook_pending(sid, id))
-- KEYS[4]  the endpoint's delivery log, a list                 (keys.webhook_log(sid, id))
-- ARGV[1]  the endpoint id         ARGV[2]  the log's length
-- ARGV[3]  seconds of failing deliveries after which the endpoint is disabled
-- ARGV[4], ARGV[5], ...  one group of six per attempt:
--          the event id; when the attempt ended, Unix seconds;
--          "delivered", "retry" or "give_up"; with "retry", when to try again (else "");
--          the attempt just made (1, 2, ...); the log entry, JSON
--
-- An attempt whose event is not pending any more (another worker finished it after this
-- one's lease ended) writes nothing. Returns how many attempts were recorded.

local raw = redis.call("HGET", KEYS[1], ARGV[1])
local record = nil
if raw then
  record = cjson.decode(raw)
end
local changed = false
local entries = {}
for i = 4, #ARGV, 6 do
  local id, now, outcome = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local pending = redis.call("HGET", KEYS[3], id)
  if pending then
    if outcome == "retry" then
      local entry = cjson.decode(pending)
      entry["attempt"] = tonumber(ARGV[i + 4])
      redis.call("HSET", KEYS[3], id, cjson.encode(entry))
      redis.call("ZADD", KEYS[2], ARGV[i + 3], id)
    else
      redis.call("HDEL", KEYS[3], id)
      redis.call("ZREM", KEYS[2], id)
    end
    entries[#entries + 1] = ARGV[i + 5]
    if record then
      local since = record["failing_since"]
      if outcome == "delivered" then
        if since ~= nil and since ~= cjson.null then
          record["failing_since"] = cjson.null
          changed = true
        end
      elseif since == nil or since == cjson.null then
        record["failing_since"] = now
        changed = true
      elseif record["enabled"] and now - tonumber(since) >= tonumber(ARGV[3]) then
        record["enabled"] = false
        record["disabled_at"] = now
        record["disabled_reason"] = "failing"
        changed = true
      end
    end
  end
end
if #entries > 0 then
  redis.call("LPUSH", KEYS[4], unpack(entries))
  redis.call("LTRIM", KEYS[4], 0, tonumber(ARGV[2]) - 1)
end
if changed then
  redis.call("HSET", KEYS[1], ARGV[1], cjson.encode(record))
end
return #entries
