"""Request validation: marshmallow schemas, their error bodies and their JSON Schema.

Build the schemas once per app (:func:`make_schemas`), load each request body with
:func:`load_or_raise`, which raises the API's 400 :class:`postroom.shared.errors.ValidationError`.
Loaded data uses the JSON names as keys (``from``, ``hLimit``). Address rules (bare
addresses, no SMTPUTF8, IDN domains in ``xn--`` form, mixed-script domains refused) are
in :mod:`postroom.shared.schemas.addresses`.
"""

from postroom.shared.schemas.addresses import address_key, normalize_address
from postroom.shared.schemas.json_schema import Converter
from postroom.shared.schemas.loading import convert_messages, load_or_raise, summary
from postroom.shared.schemas.schema_set import Schemas, make_schemas
from postroom.shared.schemas.send import (
    ConnectionSchema,
    SendRequestSchema,
    check_sender,
    make_send_schema,
)
from postroom.shared.schemas.solutions import (
    SolutionConfigSchema,
    SolutionCreateSchema,
    make_config_schema,
    make_create_schema,
)
from postroom.shared.schemas.suppressions import EventSchema, SuppressionSchema, email_param

__all__ = [
    "ConnectionSchema",
    "Converter",
    "EventSchema",
    "Schemas",
    "SendRequestSchema",
    "SolutionConfigSchema",
    "SolutionCreateSchema",
    "SuppressionSchema",
    "address_key",
    "check_sender",
    "convert_messages",
    "email_param",
    "load_or_raise",
    "make_config_schema",
    "make_create_schema",
    "make_schemas",
    "make_send_schema",
    "normalize_address",
    "summary",
]
