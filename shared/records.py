"""The records both sides pass around, typed: the send request as the schema loads it, the
relay spec, the job that goes through the broker, and the task document.

They are ``TypedDict``s: at run time plain dicts (they travel as JSON), for mypy records
with known keys. Names that are Python keywords (``from``) use the functional form.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

if TYPE_CHECKING:
    from postroom.shared.schemas.attachments import Attachment


class Connection(TypedDict):
    """A send request's own relay, as loaded (``port`` defaulted by scheme)."""

    server: str
    port: int
    user: str | None
    password: str | None
    #: ``smtp`` (STARTTLS), ``smtps`` (implicit TLS) or ``""`` (plain text)
    scheme: str


#: A loaded ``POST …/email`` body (:mod:`postroom.shared.schemas.send`): every key present.
SendRequest = TypedDict(
    "SendRequest",
    {
        "to": list[str],
        "cc": list[str],
        "bcc": list[str],
        "from": str | None,
        "subject": str | None,
        "text": str | None,
        "html": str | None,
        "hLimit": int | None,
        "connection": Connection | None,
        "reply_to": list[str],
        "headers": dict[str, str],
        "attachments": "list[Attachment]",
        "template": str | None,
        "template_data": dict[str, Any],
        "send_at": float | None,
        "metadata": dict[str, str],
    },
)


class RelaySpec(TypedDict):
    """The caller's relay as a job carries it: the request's, else the solution's."""

    host: str
    port: int
    scheme: str
    user: str | None
    #: sealed with :class:`postroom.shared.crypto.SecretBox`
    password: str | None


class AttachmentMeta(TypedDict):
    """What a job carries of an attachment (its bytes are stored apart)."""

    filename: str
    content_type: str
    content_id: str | None
    size: int


#: The message of a job: the envelope sender and what the MIME message is built from.
Message = TypedDict(
    "Message",
    {
        "from": str,
        "to": list[str],
        "cc": list[str],
        "bcc": list[str],
        "subject": str | None,
        "text": str | None,
        "html": str | None,
        "reply_to": NotRequired[list[str]],
        "headers": NotRequired[dict[str, str]],
    },
)


class Job(TypedDict):
    """One send as it goes through the broker (built at intake, read by the worker)."""

    task_id: str
    solution_id: str
    created_at: float
    message_id: str
    #: the request's own hLimit, if it named one
    hlimit: int | None
    #: None: the default relay (``POSTROOM_DEFAULT_SMTP_URL``)
    relay: RelaySpec | None
    message: Message
    metadata: dict[str, str]
    attachments: NotRequired[list[AttachmentMeta]]
    #: when a scheduled send is due (epoch seconds)
    send_at: NotRequired[float]


class TaskDocument(TypedDict):
    """The state of one accepted message, as the caller reads it (``GET …/tasks/{id}``)."""

    task_id: str
    solution_id: str
    #: one of :data:`postroom.shared.documents.STATES`
    state: str
    attempts: int
    created_at: str | None
    updated_at: str | None
    next_attempt_at: str | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    pending: list[str]
    metadata: dict[str, str]
