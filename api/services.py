"""What the API's routes use, built once per app from the settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
from flask import current_app

from postroom.api.auth import Principal, authenticate, authorize
from postroom.api.intake.idempotency import IdempotencyStore
from postroom.api.intake.one_step import OneStepIntake
from postroom.api.templates.store import TemplateStore
from postroom.shared.connections import redis_clients
from postroom.shared.crypto import SecretBox
from postroom.shared.documents import DocumentStore
from postroom.shared.errors import InvalidRelay, ValidationError
from postroom.shared.guard import PLAIN_TEXT_REFUSED, CachedResolver, RelayGuard
from postroom.shared.queue import Enqueuer, make_enqueuer
from postroom.shared.ratelimit import TokenBucket
from postroom.shared.relays import configured_relay
from postroom.shared.schemas import make_schemas
from postroom.shared.schemas.webhooks import WebhookCreateSchema, WebhookPatchSchema
from postroom.shared.settings import Settings
from postroom.shared.solutions import Solution, SolutionStore
from postroom.shared.suppressions import SuppressionStore
from postroom.shared.webhooks import WebhookGuard, WebhookStore


@dataclass(frozen=True)
class WebhookSchemas:
    create: WebhookCreateSchema = field(default_factory=WebhookCreateSchema)
    patch: WebhookPatchSchema = field(default_factory=WebhookPatchSchema)

PLAIN_TEXT_FIELD = (
    'Plain text ("") is allowed only toward relays listed in POSTROOM_SMTP_ALLOW_HOSTS; '
    'use "smtp" (STARTTLS) or "smtps" (implicit TLS).'
)


@dataclass
class Services:
    settings: Settings
    state: redis.Redis
    results: redis.Redis
    box: SecretBox
    solutions: SolutionStore
    documents: DocumentStore
    idempotency: IdempotencyStore
    bucket: TokenBucket
    enqueuer: Enqueuer
    schemas: Any
    suppressions: SuppressionStore
    guard: RelayGuard
    #: the one-round-trip send, when the queue and the documents share postroom's Redis
    one_step: OneStepIntake | None
    #: the solutions' message templates
    templates: TemplateStore
    # -- webhooks --
    webhooks: WebhookStore
    webhook_guard: WebhookGuard
    schemas_webhooks: WebhookSchemas

    @classmethod
    def build(cls, settings: Settings) -> Services:
        state, results = redis_clients(settings, socket_timeout=5.0)
        box = SecretBox(settings.secret_key)
        documents = DocumentStore(results, settings.result_ttl)
        enqueuer = make_enqueuer(settings, state)
        return cls(
            settings=settings,
            state=state,
            results=results,
            box=box,
            solutions=SolutionStore(state, box, settings.hlimit_default),
            documents=documents,
            idempotency=IdempotencyStore(state),
            bucket=TokenBucket(state, settings.hlimit_period_s),
            enqueuer=enqueuer,
            schemas=make_schemas(settings),
            suppressions=SuppressionStore(state, settings.bounce_threshold),
            guard=RelayGuard(settings.smtp_allow_hosts, settings.smtp_allow_ports,
                             resolver=CachedResolver()),
            one_step=OneStepIntake.build(settings, state, results is state, documents,
                                         enqueuer),
            templates=TemplateStore(state),
            webhooks=WebhookStore(state, box),
            webhook_guard=WebhookGuard(settings.webhook_allow_hosts, resolver=CachedResolver()),
            schemas_webhooks=WebhookSchemas(),
        )

    @property
    def one_redis(self) -> bool:
        """Whether the documents are in the state's Redis (one client:
        :func:`postroom.shared.connections.same_redis`): then their writes share a transaction."""
        return self.results is self.state

    def principal(self) -> Principal:
        return authenticate(self.settings.admin_token, self.solutions)

    def authorize(self, sid: str) -> tuple[Principal, Solution]:
        """The caller and solution ``sid``, in one round trip (401, then 404)."""
        return authorize(self.settings.admin_token, self.solutions, sid)

    def check_relay(
        self, host: str, port: int, scheme: str, scheme_field: list[str] | None
    ) -> None:
        """A caller-chosen relay at intake: 400 ``InvalidRelay`` when its address or port
        is refused now (a name that does not resolve is left to the worker), and a 400
        when it is plain text toward a relay that ``POSTROOM_SMTP_ALLOW_HOSTS`` does not
        list: a ``ValidationError`` naming ``scheme_field`` (a path into the request, e.g.
        ``["connection", "scheme"]``), or ``InvalidRelay`` when the relay is a stored one."""
        exempt = self.guard.precheck(host, port)
        if scheme == "" and not exempt:
            if scheme_field is None:
                raise InvalidRelay(PLAIN_TEXT_REFUSED)
            messages: Any = [PLAIN_TEXT_FIELD]
            for name in reversed(scheme_field):
                messages = {name: messages}
            raise ValidationError(f"invalid fields: {'.'.join(scheme_field)}", fields=messages)

    def check_config_relay(self, config: Mapping[str, Any]) -> None:
        """A solution configuration's own relay (as it will be stored): the intake checks,
        a plain-text refusal naming ``connection_scheme``."""
        relay = configured_relay(config)
        if relay is not None:
            self.check_relay(relay["host"], relay["port"], relay["scheme"], ["connection_scheme"])


def services() -> Services:
    svc: Services = current_app.extensions["postroom"]
    return svc
