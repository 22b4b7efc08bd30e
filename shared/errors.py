"""The one error hierarchy of postroom.

Every error a caller can meet is a :class:`PostroomError`; its :meth:`body` is the one
error body of the API and of task documents: ``{type, error, status, ...extra}``.
"""

from __future__ import annotations

from typing import Any


class ConfigError(Exception):
    """The service is misconfigured; raised at start-up with a message naming the setting."""


class PostroomError(Exception):
    """Root of every error a caller can see."""

    status: int = 500
    type_name: str | None = None  # defaults to the class name

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    @property
    def type(self) -> str:
        return self.type_name or type(self).__name__

    def body(self) -> dict[str, Any]:
        return {"type": self.type, "error": self.message, "status": self.status, **self.extra}


# -- request errors (the API answers them at once) ---------------------------------


class ValidationError(PostroomError):
    status = 400

    def __init__(self, message: str, fields: dict[str, Any] | None = None) -> None:
        super().__init__(message, fields=fields or {})


class InvalidRelay(PostroomError):
    status = 400


class Unauthorized(PostroomError):
    status = 401


class Forbidden(PostroomError):
    status = 403


class NotFound(PostroomError):
    status = 404


class MethodNotAllowed(PostroomError):
    status = 405


class Conflict(PostroomError):
    status = 409


class PayloadTooLarge(PostroomError):
    status = 413


class UnsupportedMediaType(PostroomError):
    status = 415


class IdempotencyMismatch(PostroomError):
    status = 422


class RateLimited(PostroomError):
    status = 429


class Blocked(PostroomError):
    status = 429

    @classmethod
    def recipients(cls, blocked: list[str]) -> Blocked:
        """The refusal of a message to ``blocked``, addresses on the suppression list."""
        which = "a recipient is" if len(blocked) == 1 else f"{len(blocked)} recipients are"
        return cls(f"{which} on the suppression list; nothing was sent", blocked=blocked)


class ServiceUnavailable(PostroomError):
    status = 503


class InternalError(PostroomError):
    """A fault of postroom itself (a task document records it rather than stay queued)."""

    status = 500


# -- send outcomes (the worker records them in the task document) -----------------


class SendError(PostroomError):
    """A send did not succeed; ``transient`` says whether retrying may help."""

    transient = False
    status = 502

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message, **extra)
        # RCPT TO replies of recipients refused for good: address -> (code, reply)
        self.rcpt_rejections: dict[str, tuple[int, str]] = {}


class TransientSendError(SendError):
    """Worth another attempt later (connection trouble, 4xx replies, timeouts)."""

    transient = True
    type_name = "SmtpUnavailable"
    status = 504

    def __init__(self, message: str, retry_after: float | None = None, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.retry_after = retry_after


class PermanentSendError(SendError):
    """Retrying cannot help."""


class SmtpRejected(PermanentSendError):
    status = 502


class SmtpAuthFailed(PermanentSendError):
    status = 502


class TlsError(PermanentSendError):
    status = 502


class SmtpUnavailable(PermanentSendError):
    """Transient failures outlasted the retry budget."""

    status = 504


class RelayRefused(PermanentSendError):
    """The relay's address is not allowed (the worker's own check at connect time)."""

    type_name = "InvalidRelay"
    status = 400
