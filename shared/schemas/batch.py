"""The body of ``POST /solutions/{sid}/email/batch``: ``{"messages": [send, ...]}``.

The schema checks the envelope only: an object with one field, ``messages``, a list of 1 to
``POSTROOM_MAX_BATCH`` items. Each item is a send request, loaded and judged on its own by
the route (a bad item is that item's 400, not the batch's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from marshmallow import fields
from marshmallow.validate import Length

from postroom.shared.schemas.fields import NULL, REQUIRED, StrictSchema

if TYPE_CHECKING:
    from postroom.shared.settings import Settings


class BatchRequestSchema(StrictSchema):
    messages = fields.List(
        fields.Raw(allow_none=True),
        required=True,
        error_messages={"required": REQUIRED, "null": NULL, "invalid": "Must be a list."},
    )

    def __init__(self, max_batch: int) -> None:
        super().__init__()
        self.max_batch = max_batch
        self.fields["messages"].validators = [
            Length(1, max_batch, error=f"Must hold 1 to {max_batch} messages.")
        ]


def make_batch_schema(settings: Settings) -> BatchRequestSchema:
    return BatchRequestSchema(settings.max_batch)
