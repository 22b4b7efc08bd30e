"""The one error handler: every error leaves the API as ``{type, error, status, ...}``."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from werkzeug.exceptions import HTTPException

from postroom.shared.errors import PostroomError, RateLimited, ServiceUnavailable, Unauthorized

log = logging.getLogger("postroom.api")

_HTTP_TYPES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
}


def error_response(err: PostroomError) -> Response:
    response = jsonify(err.body())
    response.status_code = err.status
    if isinstance(err, Unauthorized):
        response.headers["WWW-Authenticate"] = 'Bearer realm="postroom"'
    if isinstance(err, RateLimited):
        retry_after = err.extra.get("retry_after")
        if retry_after is not None:
            response.headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
    return response


def register(app: Flask) -> None:
    @app.errorhandler(PostroomError)
    def _postroom(err: PostroomError) -> Response:
        return error_response(err)

    @app.errorhandler(HTTPException)
    def _http(err: HTTPException) -> Response:
        status = err.code or 500
        message = {
            404: "no such route",
            405: "method not allowed on this route",
            413: "the request body is too large",
        }.get(status, err.description or "request error")
        response = jsonify(
            {"type": _HTTP_TYPES.get(status, "HttpError"), "error": message, "status": status}
        )
        response.status_code = status
        if status == 405:  # RFC 9110: a 405 says which methods the route takes
            allowed = getattr(err, "valid_methods", None) or []
            response.headers["Allow"] = ", ".join(sorted(allowed))
        return response

    def _store_down(err: Exception) -> Response:
        # Redis (state, broker or results) does not answer: nothing was accepted; retry
        log.warning("Redis unavailable: %s", type(err).__name__)
        return error_response(
            ServiceUnavailable("the service's store is unavailable; nothing was done, retry")
        )

    app.register_error_handler(RedisConnectionError, _store_down)
    app.register_error_handler(RedisTimeoutError, _store_down)

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        log.exception("unhandled error")
        response = jsonify({"type": "InternalError", "error": "internal error", "status": 500})
        response.status_code = 500
        return response
