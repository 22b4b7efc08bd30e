-- postroom worker: take the events of one webhook endpoint that are due, for a while
-- (worker/webhooks.py). A taken event is due again when its lease ends: a worker killed while
-- delivering it leaves it to another (at least once).
--
-- KEYS[1]  the solution's webhook endpoints, a hash id -> JSON record  (keys.webhooks(sid))
-- KEYS[2]  the endpoint's due events, a sorted set           (keys.webhook_due(sid, id))
-- KEYS[3]  the endpoint's pending events, a hash          (keys.webhook_pending(sid, id))
-- KEYS[4]  the endpoint's delivery log, a list                 (keys.webhook_log(sid, id))
-- ARGV[1]  the endpoint id      ARGV[2]  now, Unix seconds
-- ARGV[3]  the lease, seconds   ARGV[4]  the most events to take
--
-- Returns {record, id, pending, id, pending, ...}: the endpoint's record (JSON) and the
-- events taken with their pending entries (JSON {type, body, attempt}); none are taken
-- from a disabled endpoint. {false} when the endpoint is gone: its keys are removed.

local record = redis.call("HGET", KEYS[1], ARGV[1])
if not record then
  redis.call("DEL", KEYS[2], KEYS[3], KEYS[4])
  return { false }
end
local out = { record }
if not cjson.decode(record)["enabled"] then
  return out
end
local until_ = tonumber(ARGV[2]) + tonumber(ARGV[3])
local due = redis.call("ZRANGEBYSCORE", KEYS[2], "-inf", ARGV[2], "LIMIT", 0, tonumber(ARGV[4]))
for _, id in ipairs(due) do
  local pending = redis.call("HGET", KEYS[3], id)
  if pending then
    redis.call("ZADD", KEYS[2], until_, id)
    out[#out + 1] = id
    out[#out + 1] = pending
  else
    redis.call("ZREM", KEYS[2], id)
  end
end
return out
