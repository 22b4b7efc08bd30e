-- postroom: change fields of one webhook endpoint's record (shared/webhooks.py), in one step
-- (the workers change the same record when deliveries fail: nothing is lost between them).
--
-- KEYS[1]  the solution's webhook endpoints, a hash id -> JSON record  (keys.webhooks(sid))
-- ARGV[1]  the endpoint id
-- ARGV[2]  JSON object: the fields to set (null clears one)
--
-- Returns the record as written, or false (nil in Python) when there is no such endpoint.

local raw = redis.call("HGET", KEYS[1], ARGV[1])
if not raw then
  return false
end
local record = cjson.decode(raw)
for name, value in pairs(cjson.decode(ARGV[2])) do
  record[name] = value
end
local out = cjson.encode(record)
redis.call("HSET", KEYS[1], ARGV[1], out)
return out
