"""One frozen, typed view of the ``POSTROOM_*`` environment.

Environment variables are read in exactly one place — :meth:`Settings.from_env` —
called by the entry points (``postroom api``, ``postroom worker``, ``postroom dev``).
Everything else receives a ``Settings`` instance. Tests build one from a dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from postroom.shared.errors import ConfigError

PREFIX = "POSTROOM_"


def _int(name: str, raw: str, minimum: int = 0) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{PREFIX}{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{PREFIX}{name} must be >= {minimum}, got {value}")
    return value


def _float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{PREFIX}{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{PREFIX}{name} must be >= 0, got {value}")
    return value


def _list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _ports(name: str, raw: str) -> tuple[int, ...]:
    return tuple(_int(name, p, 1) for p in _list(raw))


def _bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{PREFIX}{name} must be true or false, got {raw!r}")


@dataclass(frozen=True)
class Settings:
    """Every knob of the service. Field names are the variable names without the prefix."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str = ""  # defaults to redis_url
    result_backend: str = ""  # defaults to redis_url
    admin_token: str = field(default="", repr=False)
    secret_key: str = field(default="", repr=False)
    default_smtp_url: str = field(default="", repr=False)
    default_sender_domain: str = "localhost"
    smtp_allow_hosts: tuple[str, ...] = ()
    smtp_allow_ports: tuple[int, ...] = (25, 465, 587, 2525)
    smtp_ca_file: str = ""
    smtp_timeout_s: float = 30.0
    smtp_pool_idle_s: float = 30.0
    smtp_pool_max_messages: int = 100
    hlimit_period_s: int = 3600
    hlimit_default: int = 10
    retry_base_s: float = 60.0
    retry_max_delay_s: float = 3600.0
    retry_max_attempts: int = 30
    retry_max_age_s: int = 86400
    visibility_timeout_s: int = 7200
    worker_batch: int = 50
    result_ttl: int = 7 * 86400
    max_recipients: int = 50
    max_batch: int = 500
    max_body_bytes: int = 10 * 1024 * 1024
    bounce_threshold: int = 3
    queue: str = "email"
    log_format: str = "json"  # "json" or "text"
    log_level: str = "INFO"
    check_dns: bool = False
    # -- attachments and templates --
    max_attachment_bytes: int = 7 * 1024 * 1024  # decoded, all of a message's together
    max_template_bytes: int = 64 * 1024  # a stored template's subject, text and html

    # -- operations: metrics and probes (deploy/) -------------------------------------
    # (deploy/ sizes the workers' stop grace periods on send_deadline_s, below)
    # port of the worker's Prometheus endpoint (0: none)
    worker_metrics_port: int = 9808
    # where a command's processes keep their metrics (prometheus_client's multiprocess
    # files, in a subdirectory per command, emptied when it starts); "": a temporary one
    metrics_dir: str = ""
    # label message metrics with the solution id (one series per solution: off by default)
    metrics_solution_label: bool = False
    # files a worker touches while alive and holds while it consumes (k8s probes); "": none
    worker_heartbeat_file: str = ""
    worker_ready_file: str = ""
    worker_heartbeat_interval_s: float = 10.0
    # -- end of operations ----------------------------------------------------------------

    # -- delivery events (webhooks) ------------------------------------------------
    webhook_allow_hosts: tuple[str, ...] = ()
    webhook_retry_base_s: float = 5.0
    webhook_retry_max_delay_s: float = 6 * 3600.0
    webhook_max_attempts: int = 8
    webhook_timeout_s: float = 10.0
    webhook_connect_timeout_s: float = 5.0
    webhook_disable_after_s: int = 86400
    webhook_concurrency: int = 16
    webhook_endpoint_concurrency: int = 4
    webhook_poll_s: float = 0.2

    # -- brokers and Redis topologies (docs/scaling.md) ----------------------------
    #: the Sentinel master of a sentinel:// broker; "" = the one in a redis+sentinel:// URL
    broker_master_name: str = ""
    #: how long a publish to RabbitMQ waits for the broker's confirm (then 503)
    broker_confirm_timeout_s: float = 5.0
    # -- end of brokers and Redis topologies -----------------------------------------

    # -- delivery to relays far away: sends in flight, per-relay cap, send deadline ----
    #: SMTP transactions in flight at once in one ``postroom worker`` instance
    sends_in_flight: int = 100
    #: transactions in flight at once to one relay (host, port, user, scheme) per instance
    relay_concurrency: int = 20
    #: one message's whole SMTP exchange (connect to the end of DATA) ends within this
    send_deadline_s: float = 120.0
    #: a worker instance refreshes its heartbeat this often; one silent for
    #: ``instance_dead_after_s`` is dead and its unacknowledged messages are taken back
    instance_heartbeat_s: float = 3.0
    instance_dead_after_s: float = 15.0

    # -- construction -------------------------------------------------------------

    def __post_init__(self) -> None:
        from postroom.shared.brokers import check_broker_url, default_broker_url

        if not self.broker_url:
            object.__setattr__(self, "broker_url", default_broker_url(self.redis_url))
        check_broker_url(self.broker_url)
        if not self.result_backend:
            object.__setattr__(self, "result_backend", self.redis_url)
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"{PREFIX}LOG_FORMAT must be json or text, got {self.log_format!r}")
        if self.worker_batch < 1:
            raise ConfigError(f"{PREFIX}WORKER_BATCH must be >= 1, got {self.worker_batch}")
        if self.max_batch < 1:
            raise ConfigError(f"{PREFIX}MAX_BATCH must be >= 1, got {self.max_batch}")
        if self.worker_metrics_port > 65535:
            raise ConfigError(
                f"{PREFIX}WORKER_METRICS_PORT must be a port (0 turns it off), "
                f"got {self.worker_metrics_port}"
            )
        for name in ("sends_in_flight", "relay_concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{PREFIX}{name.upper()} must be >= 1, got {getattr(self, name)}")
        if self.send_deadline_s <= 0:
            raise ConfigError(f"{PREFIX}SEND_DEADLINE_S must be > 0, got {self.send_deadline_s}")
        if not 0 < self.instance_heartbeat_s < self.instance_dead_after_s:
            raise ConfigError(
                f"{PREFIX}INSTANCE_HEARTBEAT_S must be > 0 and shorter than "
                f"{PREFIX}INSTANCE_DEAD_AFTER_S"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, require_secrets: bool = True) -> Settings:
        """Read ``POSTROOM_*`` variables. Unknown ``POSTROOM_`` names are an error (typos)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in environ.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX) :].lower()
            if name not in known:
                raise ConfigError(f"unknown setting {key}")
            values[name] = _parse(name.upper(), known[name].type, raw)
        settings = cls(**values)
        if require_secrets:
            settings.require_secrets()
        return settings

    def require_secrets(self) -> None:
        missing = [
            f"{PREFIX}{name.upper()}"
            for name in ("admin_token", "secret_key")
            if not getattr(self, name)
        ]
        if missing:
            raise ConfigError(
                f"{' and '.join(missing)} must be set "
                "(generate a secret key with `postroom keygen`)"
            )
        from postroom.shared.crypto import check_key

        check_key(self.secret_key)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _parse(name: str, type_: Any, raw: str) -> Any:
    kind = str(type_)
    if kind == "int":
        return _int(name, raw)
    if kind == "float":
        return _float(name, raw)
    if kind == "bool":
        return _bool(name, raw)
    if kind == "tuple[int, ...]":
        return _ports(name, raw)
    if kind == "tuple[str, ...]":
        return _list(raw)
    return raw
