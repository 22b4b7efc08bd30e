"""A send naming a stored template: rendered at intake, so a worker never meets a render
error (see :mod:`postroom.api.templates.store`).

The rendered subject, text and html replace the request's (which a template send may not
give) and pass the same rules a given subject, text and html pass: a render that breaks one
(a control character, an encoded-word, a subject over 998 characters) is the send's 400
naming ``template_data``; an unknown template is a 400 naming ``template``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import marshmallow

from postroom.api.services import Services
from postroom.api.templates.store import Rendered, RenderError, render
from postroom.shared.errors import ValidationError
from postroom.shared.records import SendRequest
from postroom.shared.schemas import convert_messages
from postroom.shared.schemas.attachments import Attachment, check_inline


def apply_template(svc: Services, sid: str, data: SendRequest) -> None:
    """Render the template ``data`` names (if any) into its subject, text and html."""
    if data["template"] is None:
        return
    rendered = render_template(svc, sid, data["template"], data["template_data"],
                               data["attachments"])  # fmt: skip
    data["subject"], data["text"], data["html"] = rendered.subject, rendered.text, rendered.html


def render_template(
    svc: Services,
    sid: str,
    name: str,
    template_data: Mapping[str, Any],
    attachments: Sequence[Attachment] = (),
) -> Rendered:
    """Template ``name`` rendered with ``template_data``, each part checked as a given
    subject, text and html are, and ``attachments``' inline parts checked against the
    rendered html."""
    template = svc.templates.get(sid, name)
    if template is None:
        raise ValidationError("invalid fields: template",
                              fields={"template": [f"No template named {name!r}."]})
    try:
        rendered = render(template, template_data)
    except RenderError as exc:
        raise _bad_data(str(exc)) from None
    fields = svc.schemas.send.fields
    for part, value in rendered.as_dict().items():
        if value is None:
            continue
        try:
            for validate in fields[part].validators:
                validate(value)
        except marshmallow.ValidationError as exc:
            messages = exc.messages if isinstance(exc.messages, list) else [str(exc.messages)]
            raise _bad_data(f"the rendered {part}: {' '.join(map(str, messages))}") from None
    try:
        check_inline(list(attachments), rendered.html)
    except marshmallow.ValidationError as exc:
        fields_ = convert_messages(exc.normalized_messages())
        raise ValidationError("invalid fields: attachments", fields=fields_) from None
    return rendered


def _bad_data(message: str) -> ValidationError:
    return ValidationError("invalid fields: template_data",
                           fields={"template_data": [f"The template does not render: {message}"]})
