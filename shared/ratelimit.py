"""The per-solution hLimit token bucket, taken in one atomic Redis script.

A bucket of capacity C refills continuously at C tokens per period (``hlimit_period_s``).
A send takes one token from the solution's bucket and, when the request names its own,
tighter ``hLimit``, from that request bucket too: from both in one step, or from neither.
The script (``shared/lua/bucket.lua``) reads the clock with Redis ``TIME``, so every worker
and API process shares one clock.

Semantics worth knowing:

- capacity 0 (solution or request) is never allowed: ``retry_after is None`` means
  "never"; nothing is read or written, and a message that already took its token is
  refused too (hLimit 0 stops sending);
- a request capacity at or above the solution's names no second bucket (it cannot tighten;
  the script alone decides this);
- a capacity change keeps what was used: a larger capacity adds the difference at once, a
  smaller one removes it at once (never below empty); the refill runs at the new rate;
- a bucket key that has expired is a full bucket; keys expire about when they would be full;
- ``once_key`` (the message's ledger hash) makes a take idempotent: its field ``token`` is
  set in the same step as the take, and a later take that finds it takes nothing;
- :meth:`TokenBucket.reserve` holds the next free token for a message that must wait (the
  ``defer`` policy): the bucket goes into debt, so waiting messages form a line, each with
  its own slot one refill interval after the one before, instead of all waking when the
  next token frees and racing for it. A take at or after the slot redeems it. Lowering the
  capacity voids the reservations held (they take again, under the new capacity).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import redis

from postroom.shared import keys
from postroom.shared.scripts import script

_NEVER = -1  # the script's retry_after for "never"


@cache
def _script_source() -> str:
    folder = resources.files("postroom.shared").joinpath("lua")
    return folder.joinpath("bucket.lua").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Decision:
    """The answer of one take or peek, about the tighter of the buckets involved.

    The tighter bucket is the one with the fewest whole tokens left (ties: the smaller
    capacity); ``retry_after`` is the wait until *every* bucket involved has a token.
    """

    allowed: bool
    #: whole tokens left in the tighter bucket after this call
    remaining: int
    #: capacity of the tighter bucket
    limit: int
    #: seconds until a token is available: 0.0 when allowed, None = never (capacity 0)
    retry_after: float | None
    #: seconds until the tighter bucket is full again
    reset_after: float
    #: a later slot is held for this message; ``retry_after`` is the wait until it comes
    reserved: bool = False


class TokenBucket:
    """Takes and peeks at hLimit tokens; one registered script per Redis client."""

    def __init__(self, client: redis.Redis, period_s: float) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        self._client = client
        self._period_s = float(period_s)
        self._script = client.register_script(_script_source())

    def take(
        self,
        sid: str,
        capacity: int,
        request_capacity: int | None = None,
        once_key: str | None = None,
        *,
        attempt: int = 0,
        ledger_ttl_s: int = 0,
    ) -> Decision:
        """Take one token from the solution's bucket (and the request's), or from none.

        With ``once_key`` (``keys.ledger(sid, task_id)``), a message that already took its
        token is allowed again without taking another. With ``attempt`` N as well, an
        allowed take also marks attempt N under way in that ledger (fields ``sending`` and
        ``attempts``; it then lives ``ledger_ttl_s``), in the same atomic step.
        """
        if attempt and once_key is None:
            raise ValueError("attempt needs once_key (the message's ledger)")
        return self._run(
            sid, capacity, request_capacity, once_key, "take", marks=(attempt, ledger_ttl_s)
        )

    def peek(self, sid: str, capacity: int, request_capacity: int | None = None) -> Decision:
        """What a take would answer now, taking nothing."""
        return self._run(sid, capacity, request_capacity, None, "peek")

    def reserve(
        self,
        sid: str,
        capacity: int,
        request_capacity: int | None = None,
        *,
        once_key: str,
        within_s: float,
    ) -> Decision:
        """Take a token now if one is free; else hold the next one in line for this message.

        A slot is held only when it comes within ``within_s`` seconds; then ``reserved`` is
        true and ``retry_after`` is the wait. A message that holds one already gets the same
        slot back (nothing more is taken). Refused and not reserved: the line is too long
        (``retry_after`` says how long it is) or the capacity is 0 (``retry_after`` None).
        """
        return self._run(sid, capacity, request_capacity, once_key, "reserve", within_s)

    def _run(
        self,
        sid: str,
        capacity: int,
        request_capacity: int | None,
        once_key: str | None,
        mode: str,
        within_s: float = 0.0,
        marks: tuple[int, int] = (0, 0),
    ) -> Decision:
        _check_capacity("capacity", capacity)
        script_keys = [keys.bucket(sid)]
        request_arg = -1
        if request_capacity is not None:
            _check_capacity("request_capacity", request_capacity)
            script_keys.append(keys.request_bucket(sid, request_capacity))
            request_arg = request_capacity
        if once_key is not None:
            if f"{{{sid}}}" not in once_key:
                raise ValueError(f"once_key must carry the hash tag {{{sid}}}: {once_key!r}")
            script_keys.append(once_key)
        args: list[str | int] = [
            repr(self._period_s),
            capacity,
            request_arg,
            mode,
            "1" if once_key is not None else "0",
            max(0, int(within_s * 1e6)),
            *marks,
        ]
        return decision_of(self._script(keys=script_keys, args=args))

    def queue_intake_peek(
        self, pipe: Any, sid: str, request_capacity: int | None, default_capacity: int
    ) -> Callable[[], Any]:
        """Queue on ``pipe`` a :meth:`peek` whose capacity is read from solution ``sid``'s
        record in the same step (``shared/lua/intake_peek.lua``); its reply, for
        :func:`decision_of`, is None when the solution does not exist. ``default_capacity``
        is the capacity of a record that names none. Returns what runs the same peek alone,
        loading the script first, for a pipeline that met NOSCRIPT (Redis restarted)."""
        script_keys = [keys.bucket(sid)]
        request_arg = -1
        if request_capacity is not None:
            _check_capacity("request_capacity", request_capacity)
            script_keys.append(keys.request_bucket(sid, request_capacity))
            request_arg = request_capacity
        script_keys.append(keys.solution(sid))
        args: list[str | int] = [
            repr(self._period_s), 0, request_arg, "peek", "0", 0, 0, 0, default_capacity
        ]
        run = script("intake_peek", "bucket")
        run.queue(pipe, script_keys, args)
        return lambda: run(self._client, script_keys, args)


def decision_of(answer: Any) -> Decision:
    """The :class:`Decision` in the bucket script's reply."""
    allowed, remaining, limit, retry_us, reset_us, reserved = answer
    retry = int(retry_us)
    return Decision(
        allowed=bool(allowed),
        remaining=int(remaining),
        limit=int(limit),
        retry_after=None if retry == _NEVER else retry / 1e6,
        reset_after=int(reset_us) / 1e6,
        reserved=bool(reserved),
    )


def _check_capacity(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
