"""Every request schema of one app, built once from its settings.

Building a schema deep-copies its fields (tens of microseconds each); a request only
loads. ``create_app`` builds one :class:`Schemas` and keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from postroom.shared.schemas.batch import BatchRequestSchema, make_batch_schema
from postroom.shared.schemas.send import SendRequestSchema, make_send_schema
from postroom.shared.schemas.solutions import (
    SolutionConfigSchema,
    SolutionCreateSchema,
    make_config_schema,
    make_create_schema,
)
from postroom.shared.schemas.suppressions import EventSchema, SuppressionSchema
from postroom.shared.schemas.templates import RenderSchema, TemplateSchema

if TYPE_CHECKING:
    from postroom.shared.settings import Settings


@dataclass(frozen=True)
class Schemas:
    send: SendRequestSchema
    batch: BatchRequestSchema
    create: SolutionCreateSchema
    config_put: SolutionConfigSchema
    config_patch: SolutionConfigSchema
    suppression: SuppressionSchema
    event: EventSchema
    template: TemplateSchema
    render: RenderSchema


def make_schemas(settings: Settings) -> Schemas:
    return Schemas(
        send=make_send_schema(settings),
        batch=make_batch_schema(settings),
        create=make_create_schema(settings),
        config_put=make_config_schema(settings),
        config_patch=make_config_schema(settings, partial=True),
        suppression=SuppressionSchema(),
        event=EventSchema(check_dns=settings.check_dns),
        template=TemplateSchema(max_bytes=settings.max_template_bytes),
        render=RenderSchema(),
    )
