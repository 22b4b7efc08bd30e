-- postroom intake: the hLimit peek of bucket.lua (which follows this preamble in the same
-- script) with the solution's capacity read from its record in the same step, so that the
-- intake learns who is calling, the solution, its suppressions and its bucket in one round
-- trip (shared/ratelimit.py, queue_intake_peek).
--
-- KEYS[1]  the solution's bucket                                  (keys.bucket(sid))
-- KEYS[2]  the request's bucket, only when ARGV[3] >= 0           (keys.request_bucket(...))
-- KEYS[n]  the solution's record, JSON, last key                  (keys.solution(sid))
-- ARGV     as bucket.lua's, mode "peek"; ARGV[2] is replaced by the record's hLimit
--          (ARGV[9]: the capacity of a record that names none, as postroom.shared.solutions.hlimit_of).
--
-- Returns bucket.lua's answer, or false (nil in Python) when the solution does not exist.

local record_raw = redis.call("GET", KEYS[#KEYS])
if not record_raw then
  return false
end
local record_config = cjson.decode(record_raw)["config"] or {}
local record_cap = tonumber(record_config["hLimit"]) or tonumber(ARGV[9])
KEYS[#KEYS] = nil
ARGV[2] = tostring(record_cap)
