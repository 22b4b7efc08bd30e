-- postroom: cancel a task that no worker has begun (api/cancel.py), in one step.
--
-- KEYS[1]  the message's lease, a string naming its holder         (keys.lease(sid, id))
-- KEYS[2]  the message's ledger, a hash                            (keys.ledger(sid, id))
-- KEYS[3]  the message's attachments, a hash                       (keys.attachments(sid, id))
-- KEYS[4]  the solution's webhook endpoints                        (keys.webhooks(sid))
-- KEYS[5]  the task document, JSON; only when the result backend is this Redis
--                                                                  (keys.task(sid, id))
--
-- ARGV[1]  the holder name the cancel leaves in the lease ("canceled")
-- ARGV[2]  how long that lease lasts, in milliseconds
-- ARGV[3]  with KEYS[5]: the document as it was read (JSON), compared byte for byte; else ""
-- ARGV[4]  with KEYS[5]: the document in state "canceled" (JSON); else ""
-- ARGV[5]  with KEYS[5]: the channel announcing a final document (keys.task_done_channel)
-- ARGV[6...] event_emit's arguments for the email.canceled event (shared/events.py)
--
-- Returns "canceled", or why not: "begun" (a worker holds the lease, or the ledger shows an
-- attempt: the message is being sent or was), "changed" (the document is no longer the
-- one read: read it again and decide again).
--
-- A worker's first step (attempt_begin.lua) takes the lease with SET NX and reads the
-- document in the same step: whichever of the two runs first wins, and a message is
-- never both sent and canceled. The email.canceled event is queued in the same step
-- (event_emit, joined before this file as a function).

if KEYS[5] and redis.call("GET", KEYS[5]) ~= ARGV[3] then
  return "changed"
end
if redis.call("EXISTS", KEYS[1]) == 1 or redis.call("HLEN", KEYS[2]) > 0 then
  return "begun"
end
redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
redis.call("DEL", KEYS[3])
if KEYS[5] then
  redis.call("SET", KEYS[5], ARGV[4], "KEEPTTL")
  redis.call("PUBLISH", ARGV[5], "canceled")
end
event_emit({ KEYS[4] }, { unpack(ARGV, 6) })
return "canceled"
