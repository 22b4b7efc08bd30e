-- postroom: the start of one delivery attempt, in one step: take the message's lease and
-- read what the attempt needs (worker/attempt_store.py, begin), the recipients' suppression entries
-- included; for a message at its first attempt, also its hLimit token. bucket(KEYS, ARGV)
-- is bucket.lua, joined before this file as a function.
--
-- KEYS[1]  the message's ledger, a hash                            (keys.ledger(sid, id))
-- KEYS[2]  the message's lease, a string naming its holder         (keys.lease(sid, id))
-- KEYS[3]  the solution's record, JSON                             (keys.solution(sid))
-- KEYS[4]  the solution's suppression list, a hash                 (keys.suppressions(sid))
-- KEYS[5]  the task document, JSON; only when the result backend is this Redis
--                                                                  (keys.task(sid, id))
-- KEYS[6]  the solution's bucket; only with ARGV[4]                (keys.bucket(sid))
-- KEYS[7]  the request's bucket; only when ARGV[6] >= 0    (keys.request_bucket(sid, cap))
--
-- ARGV[1]  this worker, "host:pid"
-- ARGV[2]  the lease's length in milliseconds
-- ARGV[3]  a holder whose lease may be taken over (a dead process on this host), or ""
-- ARGV[4]  with KEYS[5]: the bucket period in seconds, asking for the first take; or ""
-- ARGV[5]  the capacity of a record that names no hLimit                 ("" without ARGV[4])
-- ARGV[6]  the request's capacity (the job's hLimit), or -1              ("" without ARGV[4])
-- ARGV[7]  the ledger's time to live in seconds                          ("" without ARGV[4])
-- ARGV[8...] the message's recipients' keys in the suppression list (address_key)
--
-- The first take: when ARGV[4] is given, the lease is taken, the document is as the intake
-- wrote it (state "queued", attempts 0), the ledger is empty, the solution exists and no
-- recipient has a suppression entry, the message's token is taken as the worker's later
-- take would (bucket.lua, mode "take", once per message, marking attempt 1 `sending` in the
-- ledger when allowed), with the capacity read from the record (ARGV[5] when it names
-- none, as postroom.shared.solutions.hlimit_of).
--
-- Returns {leased (0|1), holder, lease_ms, document, solution, ledger, take, listed}:
-- leased 1: the lease is this worker's for ARGV[2] ms; solution (nil: deleted), ledger
--   (HGETALL, flat) and listed (the suppression entries of ARGV[8...], nil where none) are
--   read; holder and lease_ms are nil and 0.
-- leased 0: another holds it: holder names it, lease_ms is its PTTL; nothing else is read
--   (solution, ledger, take and listed are absent).
-- document is the task document (nil: missing, or KEYS[5] not given), whatever the lease.
-- take is bucket.lua's answer to the first take, or nil when none was made.
--
-- The lease is taken when it is free, when this worker holds it already (the same attempt
-- run again after an error), or when ARGV[3] holds it. The caller decides whether a holder
-- is dead (only it can look at this host's processes) and calls again with ARGV[3].

local doc = false
if KEYS[5] then
  doc = redis.call("GET", KEYS[5])
end

if not redis.call("SET", KEYS[2], ARGV[1], "NX", "PX", ARGV[2]) then
  local holder = redis.call("GET", KEYS[2])
  if holder == ARGV[1] or (ARGV[3] ~= "" and holder == ARGV[3]) then
    redis.call("SET", KEYS[2], ARGV[1], "PX", ARGV[2])
  else
    return { 0, holder, redis.call("PTTL", KEYS[2]), doc }
  end
end

local record = redis.call("GET", KEYS[3])
local ledger = redis.call("HGETALL", KEYS[1])
local listed = {}
local any_listed = false
if #ARGV > 7 then
  listed = redis.call("HMGET", KEYS[4], unpack(ARGV, 8))
  for i = 1, #ARGV - 7 do
    if listed[i] then
      any_listed = true
    end
  end
end
local take = false
if ARGV[4] ~= "" and doc and record and #ledger == 0 and not any_listed then
  local fresh = cjson.decode(doc)
  if fresh["state"] == "queued" and (tonumber(fresh["attempts"]) or 0) == 0 then
    local cap = tonumber((cjson.decode(record)["config"] or {})["hLimit"]) or tonumber(ARGV[5])
    local bucket_keys = { KEYS[6] }
    if tonumber(ARGV[6]) >= 0 then
      bucket_keys[2] = KEYS[7]
    end
    bucket_keys[#bucket_keys + 1] = KEYS[1]
    take = bucket(bucket_keys, { ARGV[4], tostring(cap), ARGV[6], "take", "1", "0", "1", ARGV[7] })
  end
end
return { 1, false, 0, doc, record, ledger, take, listed }
