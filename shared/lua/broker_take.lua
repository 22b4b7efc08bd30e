-- postroom worker: take up to N more jobs off a kombu Redis queue and record each as
-- unacknowledged, in one atomic step (worker/broker.py, Channel._take_more).
--
-- kombu's own consumer takes one job per BRPOP and records it in a second command; a Redis
-- that dies between the two has lost the job. Here the pop and the record are one step.
--
-- KEYS[1]  the queue (a list; producers LPUSH, consumers take from the right)
-- KEYS[2]  kombu's unacked hash      (delivery tag -> [message, exchange, routing key])
-- KEYS[3]  kombu's unacked index     (delivery tag -> time delivered)
-- KEYS[4]  optional: the worker instance's set of the tags it holds (postroom's own)
-- ARGV[1]  the most jobs to take
-- ARGV[2]  the time delivered (the consumer's clock, as kombu records it)
-- ARGV[3]  optional: the delivery tag of the job the BRPOP brought, recorded first
-- ARGV[4]  with ARGV[3]: its entry in the unacked hash, as kombu writes it
--
-- Returns the messages taken, as they were in the queue. A message that is not one of
-- kombu's (no delivery tag) is put back where it was and ends the take.

if ARGV[3] then
  redis.call("ZADD", KEYS[3], ARGV[2], ARGV[3])
  redis.call("HSET", KEYS[2], ARGV[3], ARGV[4])
  if KEYS[4] then redis.call("SADD", KEYS[4], ARGV[3]) end
end

local taken = {}
for _ = 1, tonumber(ARGV[1]) do
  local raw = redis.call("RPOP", KEYS[1])
  if not raw then
    break
  end
  local ok, message = pcall(cjson.decode, raw)
  local properties = ok and type(message) == "table" and message["properties"] or nil
  local tag = type(properties) == "table" and properties["delivery_tag"] or nil
  local info = type(properties) == "table" and properties["delivery_info"] or nil
  if type(tag) ~= "string" or type(info) ~= "table" then
    redis.call("RPUSH", KEYS[1], raw)
    break
  end
  local exchange = info["exchange"]
  local routing_key = info["routing_key"]
  if type(exchange) ~= "string" then exchange = "" end
  if type(routing_key) ~= "string" then routing_key = "" end
  redis.call("ZADD", KEYS[3], ARGV[2], tag)
  redis.call("HSET", KEYS[2], tag,
    "[" .. raw .. "," .. cjson.encode(exchange) .. "," .. cjson.encode(routing_key) .. "]")
  if KEYS[4] then redis.call("SADD", KEYS[4], tag) end
  taken[#taken + 1] = raw
end
return taken
