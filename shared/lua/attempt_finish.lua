-- postroom: the end of one delivery attempt, in one step: record what happened on the wire
-- in the ledger, write the task document, release the lease (worker/steps.py, finish).
--
-- KEYS[1]  the message's ledger, a hash                            (keys.ledger(sid, id))
-- KEYS[2]  the message's lease, a string naming its holder         (keys.lease(sid, id))
-- KEYS[3]  the task document, JSON; only when ARGV[4] is not ""    (keys.task(sid, id))
--
-- ARGV[1]  the holder whose lease to release ("host:pid"), or "" to leave the lease alone
-- ARGV[2]  the ledger's time to live, seconds
-- ARGV[3]  "1": the attempt talked SMTP: write the fields ARGV[8..] and end `sending`;
--          "0": the ledger only gets its time to live
-- ARGV[4]  the document, JSON, or "" (none to write)
-- ARGV[5]  the document's time to live, seconds
-- ARGV[6]  the channel that announces a final document (keys.task_done_channel), or ""
-- ARGV[7]  what it announces: the final state
-- ARGV[8], ARGV[9], ...  ledger fields and values: `rcpt:<address>` -> JSON outcome,
--          `response` -> the reply to the end of DATA
--
-- Returns 1. Every part may be run again (the step is retried after a lost reply): the
-- fields are overwritten with the same values, and a lease is released only while the
-- holder named still holds it.

if ARGV[3] == "1" then
  if #ARGV >= 9 then
    redis.call("HSET", KEYS[1], unpack(ARGV, 8))
  end
  redis.call("HDEL", KEYS[1], "sending")
end
redis.call("EXPIRE", KEYS[1], ARGV[2])

if ARGV[4] ~= "" then
  redis.call("SET", KEYS[3], ARGV[4], "EX", ARGV[5])
  if ARGV[6] ~= "" then
    redis.call("PUBLISH", ARGV[6], ARGV[7])
  end
end

if ARGV[1] ~= "" and redis.call("GET", KEYS[2]) == ARGV[1] then
  redis.call("DEL", KEYS[2])
end
return 1
