-- postroom: queue delivery events for a solution's webhook endpoints (shared/events.py).
-- Run alone, or joined as a function before a script that changes a task and calls it in
-- the same step (attempt_finish.lua): an event is queued exactly when its change is made.
--
-- KEYS[1]  the solution's webhook endpoints, a hash id -> JSON record  (keys.webhooks(sid))
--
-- ARGV[1]  the prefix of the endpoints' keys                     (keys.webhook_prefix(sid))
--          <prefix><id>:due      sorted set: event id -> when to try it next (Unix seconds)
--          <prefix><id>:pending  hash: event id -> JSON {type, body, attempt}
-- ARGV[2]  now, Unix seconds
-- ARGV[3]  only this endpoint id (a test event), or "" for every subscribed one
-- ARGV[4], ARGV[5], ARGV[6] ...  triples: the event id (webhook-id), its type, its body
--
-- An endpoint gets an event when it is enabled and its `events` list the type or "*"
-- (a test event goes to the endpoint named, enabled or not). Returns how many deliveries
-- were queued.

local records = redis.call("HGETALL", KEYS[1])
local queued = 0
for i = 1, #records, 2 do
  local wid = records[i]
  local rec = cjson.decode(records[i + 1])
  if ARGV[3] == "" or ARGV[3] == wid then
    for j = 4, #ARGV, 3 do
      local id, kind, body = ARGV[j], ARGV[j + 1], ARGV[j + 2]
      local wanted = ARGV[3] ~= ""
      if not wanted and rec["enabled"] then
        for _, name in ipairs(rec["events"] or {}) do
          if name == "*" or name == kind then
            wanted = true
          end
        end
      end
      if wanted then
        redis.call("ZADD", ARGV[1] .. wid .. ":due", ARGV[2], id)
        redis.call("HSET", ARGV[1] .. wid .. ":pending", id,
          cjson.encode({ type = kind, body = body, attempt = 0 }))
        queued = queued + 1
      end
    end
  end
end
return queued
