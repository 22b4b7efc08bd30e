"""What the API's routes use, built once per app from the settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from flask import current_app

from api.auth import Principal, authenticate
from shared.crypto import SecretBox
from shared.documents import DocumentStore
from shared.idempotency import IdempotencyStore
from shared.queue import Enqueuer, make_producer
from shared.ratelimit import TokenBucket
from shared.schemas import make_schemas
from shared.settings import Settings
from shared.solutions import SolutionStore


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

    @classmethod
    def build(cls, settings: Settings) -> Services:
        state = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=2.0, socket_timeout=5.0
        )
        results = (
            state
            if settings.result_backend == settings.redis_url
            else redis.Redis.from_url(
                settings.result_backend, socket_connect_timeout=2.0, socket_timeout=35.0
            )
        )
        box = SecretBox(settings.secret_key)
        return cls(
            settings=settings,
            state=state,
            results=results,
            box=box,
            solutions=SolutionStore(state, box),
            documents=DocumentStore(results, settings.result_ttl),
            idempotency=IdempotencyStore(state),
            bucket=TokenBucket(state, settings.hlimit_period_s),
            enqueuer=Enqueuer(make_producer(settings), settings.queue),
            schemas=make_schemas(settings),
        )

    def principal(self) -> Principal:
        return authenticate(self.settings.admin_token, self.solutions)


def services() -> Services:
    svc: Services = current_app.extensions["postroom"]
    return svc
