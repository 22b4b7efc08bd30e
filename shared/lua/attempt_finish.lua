-- postroom: the end of one delivery attempt, in one step: record what happened on the wire
-- in the ledger, write the task document, release the lease (worker/attempt_store.py, finish).
--
-- KEYS[1]  the message's ledger, a hash                            (keys.ledger(sid, id))
-- KEYS[2]  the message's lease, a string naming its holder         (keys.lease(sid, id))
-- KEYS[3]  the task document, JSON; only when ARGV[4] is not ""    (keys.task(sid, id))
-- KEYS[4]  the solution's webhook endpoints; only when ARGV[8] is not ""
--                                                                  (keys.webhooks(sid))
--
-- ARGV[1]  the holder whose lease to release ("host:pid"), or "" to leave the lease alone
-- ARGV[2]  the ledger's time to live, seconds
-- ARGV[3]  "1": the attempt talked SMTP: write the fields ARGV[8..] and end `sending`;
--          "0": the ledger only gets its time to live
-- ARGV[4]  the document, JSON, or "" (none to write)
-- ARGV[5]  the document's time to live, seconds
-- ARGV[6]  the channel that announces a final document (keys.task_done_channel), or ""
-- ARGV[7]  what it announces: the final state
-- ARGV[8]  the delivery events this document's write makes (shared/events.py,
--          finish_events), JSON {prefix, now, timestamp, events: [[id, type], ...]}, or "";
--          each event's body is {type, timestamp, data: the document}; queued by
--          event_emit (joined before this file as a function) only when the document is
--          written, in this same step
-- ARGV[9], ARGV[10], ...  ledger fields and values: `rcpt:<address>` -> JSON outcome,
--          `response` -> the reply to the end of DATA
--
-- Returns 1. Every part may be run again (the step is retried after a lost reply): the
-- fields are overwritten with the same values, and a lease is released only while the
-- holder named still holds it.

if ARGV[3] == "1" then
  if #ARGV >= 10 then
    redis.call("HSET", KEYS[1], unpack(ARGV, 9))
  end
  redis.call("HDEL", KEYS[1], "sending")
end
redis.call("EXPIRE", KEYS[1], ARGV[2])

if ARGV[4] ~= "" then
  redis.call("SET", KEYS[3], ARGV[4], "EX", ARGV[5])
  if ARGV[6] ~= "" then
    redis.call("PUBLISH", ARGV[6], ARGV[7])
  end
  if ARGV[8] ~= "" then
    local spec = cjson.decode(ARGV[8])
    local emit_args = { spec["prefix"], spec["now"], "" }
    for _, event in ipairs(spec["events"]) do
      local body = '{"type":' .. cjson.encode(event[2]) .. ',"timestamp":'
        .. cjson.encode(spec["timestamp"]) .. ',"data":' .. ARGV[4] .. "}"
      emit_args[#emit_args + 1] = event[1]
      emit_args[#emit_args + 1] = event[2]
      emit_args[#emit_args + 1] = body
    end
    event_emit({ KEYS[4] }, emit_args)
  end
end

if ARGV[1] ~= "" and redis.call("GET", KEYS[2]) == ARGV[1] then
  redis.call("DEL", KEYS[2])
end
return 1
