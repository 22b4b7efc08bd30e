"""One worker instance's send budgets, split over its pool processes.

``POSTROOM_SENDS_IN_FLIGHT`` (all relays) and ``POSTROOM_RELAY_CONCURRENCY`` (one relay)
bound the SMTP transactions in flight in one ``postroom worker`` instance. Each of its N
pool processes gets a fixed share, rounded down — ``sends_in_flight // N`` threads that
send, ``relay_concurrency // N`` connections per relay — so the shares never add up to more
than the caps, with no coordination between processes. The worker's main process makes
the split (:func:`configure`) before the pool forks; each pool process inherits it.

A process outside a worker (a test applying the task directly) has no split: one send at a
time, one connection per relay, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from postroom.shared.errors import ConfigError
from postroom.shared.settings import Settings


@dataclass(frozen=True)
class Budgets:
    """One pool process's share: ``sends`` transactions in flight (its sending threads),
    ``per_relay`` connections open to one relay."""

    sends: int = 1
    per_relay: int = 1


def split(settings: Settings, processes: int) -> Budgets:
    """The share of each of ``processes`` pool processes; ConfigError when a process
    would get nothing."""
    processes = max(1, processes)
    for name in ("sends_in_flight", "relay_concurrency"):
        if getattr(settings, name) < processes:
            raise ConfigError(
                f"POSTROOM_{name.upper()} ({getattr(settings, name)}) must be at least the "
                f"worker's pool processes ({processes}): each process needs a share"
            )
    return Budgets(
        sends=settings.sends_in_flight // processes,
        per_relay=settings.relay_concurrency // processes,
    )


#: a batch holds this many messages per connection a process may open to one relay
BATCH_PER_CONNECTION = 4


def batch_size(settings: Settings, budgets: Budgets) -> int:
    """How many messages a pool process is handed at once: ``POSTROOM_WORKER_BATCH``, or,
    when it is left at its default, at least four per connection the process may open
    to one relay. A process answers for its batch when the batch's last message ends;
    with several messages per lane that tail is a small part of the batch, while on
    loopback smaller batches keep the worker's CPU per message lower (figures:
    ``docs/throughput.md``)."""
    default = Settings.__dataclass_fields__["worker_batch"].default
    if settings.worker_batch != default:
        return settings.worker_batch
    return max(settings.worker_batch, BATCH_PER_CONNECTION * budgets.per_relay)


_current = Budgets()


def configure(budgets: Budgets) -> None:
    """This worker's per-process share (in the main process, before the pool forks)."""
    global _current
    _current = budgets


def current() -> Budgets:
    return _current
