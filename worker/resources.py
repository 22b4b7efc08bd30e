"""What a worker process uses, built once per process (after the pool forks)."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from functools import cached_property

import redis

from postroom.shared.connections import redis_clients
from postroom.shared.crypto import SecretBox
from postroom.shared.documents import DocumentStore
from postroom.shared.guard import CachedResolver, RelayGuard
from postroom.shared.ratelimit import TokenBucket
from postroom.shared.relays import Relay, parse_relay_url
from postroom.shared.settings import Settings
from postroom.shared.solutions import SolutionStore
from postroom.shared.suppressions import SuppressionStore
from postroom.worker import budgets
from postroom.worker.lease import Leases
from postroom.worker.ledger import Ledger
from postroom.worker.pool import SmtpPool
from postroom.worker.retrying import RetryPolicy
from postroom.worker.schedule import Schedule
from postroom.worker.smtp import make_ssl_context


@dataclass
class WorkerContext:
    settings: Settings
    state: redis.Redis
    results: redis.Redis

    @classmethod
    def build(cls, settings: Settings) -> WorkerContext:
        state, results = redis_clients(settings, socket_timeout=10.0)
        return cls(settings=settings, state=state, results=results)

    @property
    def one_redis(self) -> bool:
        """Whether the documents are in the state's Redis (one client:
        :func:`postroom.shared.connections.same_redis`): then one script writes both."""
        return self.results is self.state

    @cached_property
    def box(self) -> SecretBox:
        return SecretBox(self.settings.secret_key)

    @cached_property
    def solutions(self) -> SolutionStore:
        return SolutionStore(self.state, self.box, self.settings.hlimit_default)

    @cached_property
    def documents(self) -> DocumentStore:
        return DocumentStore(self.results, self.settings.result_ttl)

    @cached_property
    def bucket(self) -> TokenBucket:
        return TokenBucket(self.state, self.settings.hlimit_period_s)

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.state, self.settings.result_ttl)

    @cached_property
    def leases(self) -> Leases:
        return Leases(self.state)

    @cached_property
    def schedule(self) -> Schedule:
        return Schedule(self.state)

    @cached_property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy.from_settings(self.settings)

    @cached_property
    def suppressions(self) -> SuppressionStore:
        return SuppressionStore(self.state, self.settings.bounce_threshold)

    @cached_property
    def guard(self) -> RelayGuard:
        return RelayGuard(self.settings.smtp_allow_hosts, self.settings.smtp_allow_ports,
                          resolver=CachedResolver())

    @cached_property
    def ssl_context(self) -> ssl.SSLContext:
        return make_ssl_context(self.settings.smtp_ca_file or None)

    @cached_property
    def default_relay(self) -> Relay | None:
        if not self.settings.default_smtp_url:
            return None
        return parse_relay_url(self.settings.default_smtp_url)

    @cached_property
    def local_hostname(self) -> str:
        # what we say in EHLO; never socket.getfqdn() on the hot path
        return self.settings.default_sender_domain or socket.gethostname()

    @cached_property
    def pool(self) -> SmtpPool:
        """This process's kept SMTP connections, one set per relay and credentials."""
        return SmtpPool(
            max_idle_s=self.settings.smtp_pool_idle_s,
            max_messages=self.settings.smtp_pool_max_messages,
            max_per_relay=budgets.current().per_relay,
        )

    def warm(self) -> None:
        """Build every service now, in this thread (before several threads share them)."""
        for name in ("box", "solutions", "documents", "bucket", "ledger", "leases",
                     "schedule", "retry_policy", "suppressions", "guard", "ssl_context",
                     "default_relay", "local_hostname", "pool"):  # fmt: skip
            getattr(self, name)
