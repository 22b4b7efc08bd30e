"""``GET /solutions/{sid}/quota``: what is left of the hourly limit now.

``{hLimit, hLimit_policy, remaining, retry_after, reset_after}``: whole tokens left in the
solution's bucket; seconds until a new message could take one (0 when one is free now;
behind the messages already waiting in line under ``defer``; ``null`` for hLimit 0, never);
seconds until the bucket is full again. A peek: it takes nothing.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from postroom.api.services import services

bp = Blueprint("quota", __name__)


@bp.get("/solutions/<sid>/quota")
def show(sid: str) -> Response:
    svc = services()
    _, solution = svc.authorize(sid)
    hlimit = solution.hlimit(svc.settings.hlimit_default)
    decision = svc.bucket.peek(sid, hlimit)
    return jsonify(
        {
            "hLimit": hlimit,
            "hLimit_policy": solution.policy,
            "remaining": decision.remaining,
            "retry_after": decision.retry_after,
            "reset_after": decision.reset_after,
        }
    )
