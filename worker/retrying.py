"""The retry policy: exponential backoff with full jitter, a server's hint, a budget."""

from __future__ import annotations

import random
from dataclasses import dataclass

from shared.settings import Settings


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

    def next_delay(
        self, attempts: int, age_s: float, hint_s: float | None = None
    ) -> float | None:
        """Seconds until the next attempt after ``attempts`` tries, or None when the
        budget (attempts or age) is spent. A server's "try again in N s" is honoured
        (within the maximum delay)."""
        if attempts >= self.max_attempts:
            return None
        ceiling = min(self.max_delay_s, self.base_s * (2 ** max(0, attempts - 1)))
        # half fixed, half random: spreads a burst of retries without collapsing to 0
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        if hint_s is not None:
            delay = max(delay, min(hint_s, self.max_delay_s))
        if age_s + delay > self.max_age_s:
            return None
        return delay
