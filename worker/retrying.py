"""Two declared waiting policies, one per kind of trouble.

- :class:`RetryPolicy`: a relay's transient failure (4xx, timeouts, refused connections) is
  tried again later — exponential backoff with jitter, a server's "try again in N seconds"
  honoured, within a budget of attempts and of age. The job waits in the schedule
  (:mod:`postroom.worker.schedule`), not in a worker.
- :class:`StorePatience`: postroom's own Redis is briefly unreachable (a restart, a
  failover). The worker waits in place, a few seconds at a time, for a bounded while: the
  job cannot make progress anywhere else meanwhile, and waiting keeps what the worker
  already knows (an SMTP reply not yet written down) from being forgotten.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

from postroom.shared.settings import Settings


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float
    max_delay_s: float
    max_attempts: int
    max_age_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            base_s=settings.retry_base_s,
            max_delay_s=settings.retry_max_delay_s,
            max_attempts=settings.retry_max_attempts,
            max_age_s=settings.retry_max_age_s,
        )

    def ceiling(self, attempts: int) -> float:
        """The backoff before jitter after ``attempts`` tries: base, 2×base, 4×base, …,
        never above the maximum delay."""
        exponent = min(max(0, attempts - 1), 62)  # 2**62 × base is past any maximum
        return float(min(self.max_delay_s, self.base_s * 2**exponent))

    def next_delay(
        self, attempts: int, age_s: float, hint_s: float | None = None
    ) -> float | None:
        """Seconds until the next attempt after ``attempts`` tries, or None when the
        budget (attempts or age) is spent. A server's "try again in N s" is honoured
        (within the maximum delay)."""
        if attempts >= self.max_attempts:
            return None
        ceiling = self.ceiling(attempts)
        # "equal jitter": half fixed, half random — spreads a burst of retries (a relay that
        # deferred many messages at once) without ever collapsing a delay to nothing
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        if hint_s is not None:
            delay = max(delay, min(hint_s, self.max_delay_s))
        if age_s + delay > self.max_age_s:
            return None
        return delay


@dataclass(frozen=True)
class StorePatience:
    """How long a worker waits in place for postroom's Redis to answer again."""

    budget_s: float
    first_s: float = 0.1
    max_step_s: float = 2.0

    @classmethod
    def from_settings(cls, settings: Settings) -> StorePatience:
        # never as long as the broker's redelivery window: a job held past it is handed to
        # another worker (harmless thanks to the lease, but wasted)
        return cls(budget_s=min(300.0, settings.visibility_timeout_s / 2))

    def waits(self) -> Iterator[float]:
        """The pauses to make, in order, before each new try; they stop once the budget
        (counted from the first call of ``next``) is spent."""
        deadline = time.monotonic() + self.budget_s
        step = self.first_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            yield min(step, left)
            step = min(step * 2, self.max_step_s)
