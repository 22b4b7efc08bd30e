-- postroom worker: give back events taken from one webhook endpoint and not POSTed
-- (worker/webhooks.py: a batch whose time ran out): each is due at once, when it is still
-- under the lease this worker took it for (its score is that lease's end); an event taken
-- again by another worker since, or finished, is left alone.
--
-- KEYS[1]  the solution's webhook endpoints, a hash id -> JSON record  (keys.webhooks(sid))
-- KEYS[2]  the endpoint's due events, a sorted set           (keys.webhook_due(sid, id))
-- KEYS[3]  the endpoint's pending events, a hash          (keys.webhook_pending(sid, id))
-- KEYS[4]  the endpoint's delivery log, a list                 (keys.webhook_log(sid, id))
-- ARGV[1]  the claim's now, Unix seconds  ARGV[2]  the claim's lease, seconds
--          (webhook_claim.lua's ARGV[2] and ARGV[3]: the lease ended at their sum)
-- ARGV[3]  now, Unix seconds
-- ARGV[4], ARGV[5], ...  the event ids
--
-- Returns how many were given back.

local until_ = tonumber(ARGV[1]) + tonumber(ARGV[2])
local given = 0
for i = 4, #ARGV do
  local score = redis.call("ZSCORE", KEYS[2], ARGV[i])
  if score and tonumber(score) == until_ then
    redis.call("ZADD", KEYS[2], ARGV[3], ARGV[i])
    given = given + 1
  end
end
return given
