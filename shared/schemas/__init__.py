"""Request validation: marshmallow schemas, their error bodies and their JSON Schema.

Build the schemas once per app (:func:`make_schemas`), load each request body with
:func:`load_or_raise`, which raises the API's 400 :class:`shared.errors.ValidationError`.
Loaded data uses the JSON names as keys (``from``, ``hLimit``). Address rules (bare
addresses, no SMTPUTF8, IDN domains in ``xn--`` form, mixed-script domains refused) are
in :mod:`shared.schemas.addresses`.
"""

from shared.schemas.addresses import address_key, normalize_address
from shared.schemas.bundle import Schemas, make_schemas
from shared.schemas.json_schema import Converter
from shared.schemas.loading import convert_messages, load_or_raise, summary
from shared.schemas.send import (
    ConnectionSchema,
    SendRequestSchema,
    check_sender,
    make_send_schema,
)
from shared.schemas.solutions import (
    SolutionConfigSchema,
    SolutionCreateSchema,
    make_config_schema,
    make_create_schema,
)
from shared.schemas.suppressions import EventSchema, SuppressionSchema, email_param

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
