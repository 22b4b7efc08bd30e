"""``send_at``: when a send is due, at most 30 days ahead."""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any

from marshmallow import ValidationError

from postroom.shared.schemas.attachments import StringLoaded

MAX_SCHEDULE_S = 30 * 86400
# RFC 3339 with a required offset
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})"
)


class SendAt(StringLoaded):
    """An RFC 3339 time with an offset, loaded as Unix seconds; at most 30 days ahead."""

    json_schema: dict[str, Any] = {"type": "string", "format": "date-time"}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        text = self._text(value)
        if not _RFC3339.fullmatch(text):
            raise ValidationError(
                "Must be an RFC 3339 time with an offset, e.g. 2030-01-31T09:00:00Z.")
        try:
            when = datetime.fromisoformat(text.upper().replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise ValidationError("Must be a real date and time.") from None
        if when > time.time() + MAX_SCHEDULE_S:
            raise ValidationError("At most 30 days ahead.")
        return when
