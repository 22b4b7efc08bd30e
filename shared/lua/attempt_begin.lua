-- postroom: the start of one delivery attempt, in one step: take the message's lease and
-- read what the attempt needs (worker/steps.py, begin).
--
-- KEYS[1]  the message's ledger, a hash                            (keys.ledger(sid, id))
-- KEYS[2]  the message's lease, a string naming its holder         (keys.lease(sid, id))
-- KEYS[3]  the solution's record, JSON                             (keys.solution(sid))
-- KEYS[4]  the task document, JSON; only when the result backend is this Redis
--                                                                  (keys.task(sid, id))
--
-- ARGV[1]  this worker, "host:pid"
-- ARGV[2]  the lease's length in milliseconds
-- ARGV[3]  a holder whose lease may be taken over (a dead process on this host), or ""
--
-- Returns {leased (0|1), holder, lease_ms, document, solution, ledger}:
-- leased 1: the lease is this worker's for ARGV[2] ms; solution (nil: deleted) and ledger
--   (HGETALL, flat) are read; holder and lease_ms are nil and 0.
-- leased 0: another holds it: holder names it, lease_ms is its PTTL; nothing else is read
--   (solution and ledger are absent).
-- document is the task document (nil: missing, or KEYS[4] not given), whatever the lease.
--
-- The lease is taken when it is free, when this worker holds it already (the same attempt
-- run again after an error), or when ARGV[3] holds it. The caller decides whether a holder
-- is dead (only it can look at this host's processes) and calls again with ARGV[3].

local doc = false
if KEYS[4] then
  doc = redis.call("GET", KEYS[4])
end

if not redis.call("SET", KEYS[2], ARGV[1], "NX", "PX", ARGV[2]) then
  local holder = redis.call("GET", KEYS[2])
  if holder == ARGV[1] or (ARGV[3] ~= "" and holder == ARGV[3]) then
    redis.call("SET", KEYS[2], ARGV[1], "PX", ARGV[2])
  else
    return { 0, holder, redis.call("PTTL", KEYS[2]), doc }
  end
end

return { 1, false, 0, doc, redis.call("GET", KEYS[3]), redis.call("HGETALL", KEYS[1]) }
