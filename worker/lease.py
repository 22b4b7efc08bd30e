"""A message's lease: at most one worker talks SMTP for a message at a time.

The lease names its holder (``host:pid``). It expires on its own; a holder on this host
whose process is gone (a killed pool child) is taken over at once.
"""

from __future__ import annotations

import os
import socket

import redis

from shared import keys
from shared.text import as_str

# KEYS[1] the lease; ARGV[1] the holder expected; ARGV[2] the new holder; ARGV[3] ttl ms
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

# KEYS[1] the lease; ARGV[1] the holder
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_here(holder: str) -> bool:
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Leases:
    def __init__(self, client: redis.Redis) -> None:
        self._r = client
        self._take_over = client.register_script(_TAKE_OVER)
        self._release = client.register_script(_RELEASE)

    def acquire(self, sid: str, task_id: str, ttl_s: float) -> bool:
        key = keys.lease(sid, task_id)
        me = _holder()
        ttl_ms = int(ttl_s * 1000)
        if self._r.set(key, me, nx=True, px=ttl_ms):
            return True
        current = self._r.get(key)
        if current is None:
            return bool(self._r.set(key, me, nx=True, px=ttl_ms))
        holder = as_str(current)
        if holder == me or _dead_here(holder):
            return bool(self._take_over(keys=[key], args=[holder, me, ttl_ms]))
        return False

    def remaining_s(self, sid: str, task_id: str) -> float:
        ms = self._r.pttl(keys.lease(sid, task_id))
        return max(0.0, ms / 1000.0)

    def release(self, sid: str, task_id: str) -> None:
        self._release(keys=[keys.lease(sid, task_id)], args=[_holder()])
