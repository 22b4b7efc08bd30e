"""Two floors for the API's cost, for ``bench/bench_api.py --floor``: the same gunicorn, the
same client, a Flask view that answers at once and one that does a single ``LPUSH``.

    BENCH_REDIS_URL=redis://127.0.0.1:6379/7 gunicorn --worker-class postroom.api.server.SyncWorker
    \\
        --chdir bench floor_app:app

``POST /api/v1/solutions/<sid>/email`` answers 202 ``{"task_id": "floor"}`` (``/lpush``
after the path: the body pushed onto a Redis list first).
"""

from __future__ import annotations

import os

import redis
from flask import Flask, request
from flask.typing import ResponseReturnValue

app = Flask(__name__)
_redis = redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))


@app.get("/")
def ready() -> ResponseReturnValue:
    return "ok"


@app.post("/api/v1/solutions/<sid>/email")
def answer(sid: str) -> ResponseReturnValue:
    return {"task_id": "floor"}, 202


@app.post("/api/v1/solutions/<sid>/email/lpush")
def lpush(sid: str) -> ResponseReturnValue:
    _redis.lpush("floor", request.get_data())
    return {"task_id": "floor"}, 202
