-- postroom intake: a send that passes every check, checked and queued in one atomic step
-- (api/express.py). bucket(KEYS, ARGV) is bucket.lua, joined before this file as a function.
--
-- KEYS[1]  the caller's token entry (keys.token(hash)); unread when ARGV[1] is ""
-- KEYS[2]  the solution's record, JSON                                (keys.solution(sid))
-- KEYS[3]  the solution's suppression list, a hash                 (keys.suppressions(sid))
-- KEYS[4]  the message's task document                           (keys.task(sid, task_id))
-- KEYS[5]  the accepted set                                                (keys.accepted())
-- KEYS[6]  the broker's queue list (unused when ARGV[10] is "": the broker is RabbitMQ)
-- KEYS[7]  the solution's bucket                                         (keys.bucket(sid))
-- KEYS[8]  the solution's task list                                (keys.task_index(sid))
-- KEYS[9]  the request's bucket, only when ARGV[5] >= 0     (keys.request_bucket(sid, cap))
--
-- ARGV[1]  the solution id the token must belong to, or "" (the admin token: no read)
-- ARGV[2]  the SHA-1 of the record the job was built from
-- ARGV[3]  the bucket period in seconds
-- ARGV[4]  the solution's capacity (as that record gives it)
-- ARGV[5]  the request's capacity, or -1 (none, or not below the solution's)
-- ARGV[6]  the task document, JSON      ARGV[7]  its time to live in seconds
-- ARGV[8]  the accepted-set member      ARGV[9]  its score (when it is due for a check)
-- ARGV[10] the framed task message, pushed on the queue; "" to push nothing (the caller
--          publishes the job to RabbitMQ once this script has written the rest)
-- ARGV[11] the task list's entry (api/tasklist.py)   ARGV[12] its score (created_at)
-- ARGV[13] the oldest score the task list keeps (entries before it are trimmed)
-- ARGV[14...] the recipients' suppression keys (none when the message has none to check)
--
-- Queues the message only when the token is the solution's, the record is still the one
-- the job was built from, no recipient has a suppression entry (even an expired one: the
-- caller judges those), and the bucket has a token now (a peek: the worker takes it).
-- Returns bucket.lua's answer to the peek when queued; false (nil in Python) when it wrote
-- nothing, and the caller takes its usual path.

if ARGV[1] ~= "" and redis.call("GET", KEYS[1]) ~= ARGV[1] then
  return false
end
local record = redis.call("GET", KEYS[2])
if not record or redis.sha1hex(record) ~= ARGV[2] then
  return false
end
if #ARGV > 13 then
  local listed = redis.call("HMGET", KEYS[3], unpack(ARGV, 14))
  for i = 1, #ARGV - 13 do
    if listed[i] then
      return false
    end
  end
end

local bucket_keys = { KEYS[7] }
if tonumber(ARGV[5]) >= 0 then
  bucket_keys[2] = KEYS[9]
end
local peek = bucket(bucket_keys, { ARGV[3], ARGV[4], ARGV[5], "peek", "0" })
if peek[1] ~= 1 then
  return false
end

redis.call("SET", KEYS[4], ARGV[6], "EX", ARGV[7])
redis.call("ZADD", KEYS[5], ARGV[9], ARGV[8])
if ARGV[10] ~= "" then
  redis.call("LPUSH", KEYS[6], ARGV[10])
end
redis.call("ZADD", KEYS[8], ARGV[12], ARGV[11])
redis.call("ZREMRANGEBYSCORE", KEYS[8], "-inf", "(" .. ARGV[13])
redis.call("EXPIRE", KEYS[8], ARGV[7])
return peek
