"""A pool process's sends in flight: a batch run in lanes, one thread each.

A pool process is handed a batch of jobs (:mod:`postroom.worker.batching`). It runs them in up to
``Budgets.sends`` lanes at once (:mod:`postroom.worker.budgets`); each lane runs its share of the
batch in order, one attempt after another, so the round-trip savings of a batch (an
attempt's last Redis step carries the next one's first) hold within each lane. While one
lane waits for a relay far away, the others send: a process keeps as many SMTP
transactions in flight as it has lanes, bounded per relay by its connection pool.

Threads, not processes, because the wait is on the network: a thread costs a few hundred
kilobytes, a pool process tens of megabytes. The threads live as long as the process.

How many lanes a batch gets follows how long sends take here (:func:`width_for`): a relay
on loopback gets one or two (each lane keeps its round-trip savings, and the GIL is not
shared among threads that only wait on each other), a relay far away the whole budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# A send's own work in a pool process — building the message, its Redis steps, Celery's
# share — is about a millisecond of CPU and as long again waiting for Redis
# (docs/throughput.md).
WORK_S = 0.002
# Sends quicker than this (a relay on the same host or LAN, even on a loaded machine) get
# one lane: what they wait for is mostly CPU, which more threads would only share worse.
NEAR_S = 0.015

_executor: ThreadPoolExecutor | None = None
_size = 0


def _threads(size: int) -> ThreadPoolExecutor:
    """This process's sending threads besides its own (made on first use: after the pool
    has forked; made again only for a wider budget)."""
    global _executor, _size
    if _executor is None or _size < size:
        if _executor is not None:
            _executor.shutdown(wait=False)
        _executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="postroom-send")
        _size = size
    return _executor


def width_for(latency_s: float | None, budget: int) -> int:
    """How many lanes keep a process busy when a send takes ``latency_s`` (Little's law:
    while one send waits on the network, about ``latency / work`` others can do their
    work), at most ``budget``: one for a relay on loopback, where more threads
    only add switching and lose the round trips a lane saves; the whole budget for a
    relay tens of milliseconds away. Unknown (no send yet): the budget."""
    if latency_s is None:
        return budget
    if latency_s < NEAR_S:
        return 1
    return max(1, min(budget, math.ceil(latency_s / WORK_S)))


def run_in_lanes(items: Sequence[T], width: int,
                 run_lane: Callable[[list[T]], list[R]]) -> list[R]:  # fmt: skip
    """``run_lane`` over ``items`` split into at most ``width`` lanes (item i in lane
    i mod lanes), at once; the answers in the order of ``items``. One lane runs in the
    calling thread, the others on this process's threads."""
    lanes = max(1, min(width, len(items)))
    if lanes == 1:
        return run_lane(list(items))
    shares = [list(items[i::lanes]) for i in range(lanes)]
    pool = _threads(width - 1)
    futures = [pool.submit(run_lane, share) for share in shares[1:]]
    answers = [run_lane(shares[0])] + [f.result() for f in futures]
    out: list[R] = [None] * len(items)  # type: ignore[list-item]
    for lane, answer in enumerate(answers):
        for j, value in enumerate(answer):
            out[lane + j * lanes] = value
    return out
