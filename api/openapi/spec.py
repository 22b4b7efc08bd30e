"""The OpenAPI 3.1 document of the HTTP API, served at ``GET /api/v1/openapi.json``.

Request bodies are converted from the marshmallow schemas that validate them
(:mod:`postroom.shared.schemas.json_schema`); response bodies are written out here. Build the
document once per app: ``build_spec(settings)``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from postroom.api.openapi import rules as openapi_rules
from postroom.api.openapi import webhooks as openapi_webhooks
from postroom.shared.schemas.fields import EmailAddress
from postroom.shared.schemas.json_schema import REF_PREFIX, Converter
from postroom.shared.schemas.schema_set import make_schemas
from postroom.shared.schemas.solutions import SOLUTION_ID
from postroom.shared.schemas.validators import NoControlChars

if TYPE_CHECKING:
    from postroom.shared.settings import Settings

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0.0"
BASE_PATH = "/api/v1"
TASK_STATES = ["scheduled", "queued", "deferred", "retrying", "sent", "failed", "canceled"]
JSON = "application/json"

Schema = dict[str, Any]


def build_spec(settings: Settings) -> dict[str, Any]:
    """The whole document for ``settings`` (limits and defaults appear in it)."""
    schemas = make_schemas(settings)
    conv = Converter()
    bodies = {
        "SendRequest": conv.ref(
            schemas.send,
            "SendRequest",
            "The message to send: the Email.send parameters. null is the same as an absent field.",
        ),
        "SolutionConfig": conv.ref(
            schemas.config_put,
            "SolutionConfig",
            "The whole configuration: omitted or null fields take their defaults.",
        ),
        "SolutionConfigPatch": conv.ref(
            schemas.config_patch,
            "SolutionConfigPatch",
            "The fields to change; null puts a field back to its default.",
        ),
        "SolutionCreate": conv.ref(
            schemas.create,
            "SolutionCreate",
            "A new solution: its id (lower-case letters, digits, '_' and '-') and its "
            "configuration, omitted fields at their defaults.",
        ),
        "BatchRequest": _ref("BatchRequest"),
        "SuppressionPut": conv.ref(schemas.suppression, "SuppressionPut"),
        "Event": conv.ref(schemas.event, "Event"),
        "TemplatePut": conv.ref(schemas.template, "TemplatePut",
                                "A template: Jinja2 sources, sandboxed; html autoescaped."),
        "RenderRequest": conv.ref(schemas.render, "RenderRequest"),
    }
    bodies.update(openapi_webhooks.bodies(conv))
    components = {
        **conv.components,
        "BatchRequest": _batch_request(settings.max_batch),
        "BatchMessage": _batch_message(conv.components["SendRequest"]),
        **_response_schemas(conv.components["SolutionConfig"]),
        **_template_schemas(),
        **openapi_webhooks.components(),
    }
    components["TaskDocument"]["properties"]["metadata"] = openapi_webhooks.METADATA
    spec = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "postroom",
            "version": API_VERSION,
            "description": (
                "A queue-backed email service. Send with POST /solutions/{sid}/email; "
                "follow the task at the returned link. Request bodies are JSON of at most "
                f"{settings.max_body_bytes} bytes."
            ),
        },
        "servers": [{"url": BASE_PATH}],
        "security": [{"bearerAuth": []}],
        "tags": [{"name": name} for name in ("service", "solutions", "email", "suppressions",
                                             "templates", "webhooks")],
        "paths": {**_template_and_cancel_paths(_paths(bodies), bodies),
                  **openapi_webhooks.paths(_param, _op, _err, _json, _ref, bodies)},
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The admin token, or a solution's token for its own routes.",
                }
            },
            "parameters": {**_parameters(), **openapi_webhooks.parameters()},
            "responses": _responses(),
        },
    }
    openapi_rules.state_rules(spec, settings)
    return spec


# -- paths ----------------------------------------------------------------------------


def _paths(bodies: dict[str, Schema]) -> dict[str, Any]:
    sid = [_param("sid")]
    email = [_param("sid"), _param("email")]
    return {
        "/solution/health": {
            "get": _op(
                "health",
                "service",
                "Liveness: answers OK.",
                {"200": {"description": "OK", "content": {"text/plain": {"schema": _s("string")}}}},
                public=True,
            )
        },
        "/solution/ready": {
            "get": _op(
                "ready",
                "service",
                "Readiness: Redis and the broker answer.",
                {"200": {"description": "Ready."}, **_err(503)},
                public=True,
            )
        },
        "/openapi.json": {
            "get": _op(
                "openapi",
                "service",
                "This document.",
                {"200": _json("This document.", {"type": "object"})},
                public=True,
            )
        },
        "/solutions": {
            "post": _op(
                "createSolution",
                "solutions",
                "Create a solution (admin only); its token is shown once.",
                {"201": _json("Created.", _ref("SolutionCreated")), **_err(400, 401, 403, 409)},
                body=bodies["SolutionCreate"],
            )
        },
        "/solutions/{sid}": {
            "parameters": sid,
            "get": _op(
                "getSolution",
                "solutions",
                "A solution and its configuration (never the password).",
                {"200": _json("The solution.", _ref("Solution")), **_err(401, 404)},
            ),
        },
        "/solutions/{sid}/config": {
            "parameters": sid,
            "put": _op(
                "replaceConfig",
                "solutions",
                "Replace the configuration; omitted fields return to their defaults.",
                {"200": _json("The solution.", _ref("Solution")), **_err(400, 401, 403, 404)},
                body=bodies["SolutionConfig"],
            ),
            "patch": _op(
                "updateConfig",
                "solutions",
                "Change the given fields; null clears one.",
                {"200": _json("The solution.", _ref("Solution")), **_err(400, 401, 403, 404)},
                body=bodies["SolutionConfigPatch"],
            ),
        },
        "/solutions/{sid}/email": {
            "parameters": sid,
            "post": _op(
                "sendEmail",
                "email",
                "Queue a message. 202 once it is in the broker; with ?wait=N, 200 and the "
                "task document if it ends within N seconds.",
                {
                    "200": _json("The task ended within ?wait.", _ref("TaskDocument")),
                    "202": {
                        **_json("Queued.", _ref("Accepted")),
                        "headers": {
                            "Location": {"schema": _s("string"), "description": "The task."},
                            **_rate_headers(),
                        },
                    },
                    **_err(400, 401, 404, 422, 429, 503),
                },
                body=bodies["SendRequest"],
                parameters=[_param("IdempotencyKey"), _param("wait")],
            ),
        },
        "/solutions/{sid}/email/batch": {
            "parameters": sid,
            "post": _op(
                "sendEmailBatch",
                "email",
                "Queue up to POSTROOM_MAX_BATCH messages. 200 with an answer per message, in "
                "order: queued (status 202, its task) or refused (the error a single send "
                "would get). The request is refused whole only for the token, the solution "
                "and the body's shape; ?wait and the Idempotency-Key header are not taken "
                "(400): a message may carry its own idempotency_key.",
                {
                    "200": _json("Each message's answer.", _ref("BatchResult")),
                    **_err(400, 401, 404, 503),
                },
                body=bodies["BatchRequest"],
            ),
        },
        "/solutions/{sid}/tasks/{task_id}": {
            "parameters": [_param("sid"), _param("task_id")],
            "get": _op(
                "getTask",
                "email",
                "A task document; 404 once it has expired.",
                {"200": _json("The task.", _ref("TaskDocument")), **_err(401, 404)},
            ),
        },
        "/solutions/{sid}/quota": {
            "parameters": sid,
            "get": _op(
                "getQuota",
                "email",
                "The solution's hourly bucket now.",
                {"200": _json("The bucket.", _ref("Quota")), **_err(401, 404)},
            ),
        },
        "/solutions/{sid}/suppressions": {
            "parameters": sid,
            "get": _op(
                "listSuppressions",
                "suppressions",
                "The suppression list.",
                {"200": _json("The list.", _ref("SuppressionList")), **_err(401, 404)},
            ),
        },
        "/solutions/{sid}/suppressions/{email}": {
            "parameters": email,
            "get": _op(
                "getSuppression",
                "suppressions",
                "One suppressed address; 404 when it is not suppressed.",
                {"200": _json("Suppressed.", _ref("Suppression")), **_err(400, 401, 404)},
            ),
            "put": _op(
                "putSuppression",
                "suppressions",
                "Suppress an address (sending to it answers 429 Blocked), replacing its entry; "
                "a complaint entry only with the admin token.",
                {
                    "200": _json("Replaced an entry in force.", _ref("Suppression")),
                    "201": _json("Suppressed.", _ref("Suppression")),
                    **_err(400, 401, 403, 404),
                },
                body=bodies["SuppressionPut"],
                body_required=False,
            ),
            "delete": _op(
                "deleteSuppression",
                "suppressions",
                "Lift a suppression (and restart its bounce count); a complaint entry only "
                "with the admin token.",
                {
                    "204": {"description": "Lifted (or was not there)."},
                    **_err(400, 401, 403, 404),
                },
            ),
        },
        "/solutions/{sid}/events": {
            "parameters": sid,
            "post": _op(
                "ingestEvent",
                "suppressions",
                "Report a hard bounce or a complaint: the address is suppressed at once.",
                {"200": _json("Suppressed.", _ref("Suppression")), **_err(400, 401, 404)},
                body=bodies["Event"],
            ),
        },
    }


def _op(
    operation_id: str,
    tag: str,
    summary: str,
    responses: dict[str, Any],
    *,
    body: Schema | None = None,
    body_required: bool = True,
    parameters: list[Schema] | None = None,
    public: bool = False,
) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": operation_id, "tags": [tag], "summary": summary}
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": {JSON: {"schema": body}}}
        responses = {**responses, **_err(413, 415)}
    if public:
        op["security"] = []
    else:
        responses = {**responses, **_err(503)}
    op["responses"] = dict(sorted(responses.items()))
    return op


# -- reusable parts -------------------------------------------------------------------

_ERRORS = {
    400: ("BadRequest", "Invalid request: ValidationError (with fields) or InvalidRelay."),
    401: ("Unauthorized", "Missing or invalid token."),
    403: ("Forbidden", "A solution token on an admin-only route."),
    404: ("NotFound", "No such resource (or not this token's)."),
    409: ("Conflict", "The solution already exists, a limit is reached, or the task can no "
               "longer be canceled."),
    413: ("PayloadTooLarge", "The request body is larger than allowed."),
    415: ("UnsupportedMediaType", "The request body is not application/json."),
    422: ("IdempotencyMismatch", "This Idempotency-Key was used with another body."),
    429: ("TooManyRequests", "Blocked (a recipient is suppressed) or RateLimited."),
    503: ("ServiceUnavailable", "Redis or the broker is down; nothing was accepted."),
}


def _err(*codes: int) -> dict[str, Any]:
    return {str(code): {"$ref": f"#/components/responses/{_ERRORS[code][0]}"} for code in codes}


def _rate_headers() -> dict[str, Any]:
    return {
        "RateLimit-Limit": {"schema": _s("integer"), "description": "The tighter hLimit."},
        "RateLimit-Remaining": {"schema": _s("integer"), "description": "Whole tokens left."},
        "RateLimit-Reset": {"schema": _s("integer"), "description": "Seconds until full."},
        "RateLimit-Policy": {"schema": _s("string"), "description": "`<hLimit>;w=<period>`."},
    }


def _responses() -> dict[str, Any]:
    out = {name: _json(text, _ref("Error")) for name, text in _ERRORS.values()}
    out["Unauthorized"]["headers"] = {
        "WWW-Authenticate": {"schema": _s("string"), "description": "Bearer"}
    }
    out["TooManyRequests"]["headers"] = {
        "Retry-After": {"schema": _s("integer"), "description": "Seconds (RateLimited)."}
    }
    return out


def _parameters() -> dict[str, Any]:
    def path(name: str, schema: Schema, text: str) -> Schema:
        return {"name": name, "in": "path", "required": True, "schema": schema, "description": text}

    return {
        "sid": path("sid", {"type": "string", "pattern": f"^(?:{SOLUTION_ID})$"}, "Solution id."),
        "task_id": path("task_id", _s("string"), "Task id, from the 202."),
        "template_name": path("template_name", {"type": "string", "pattern": "^[A-Za-z0-9]"
                              "[A-Za-z0-9._-]{0,63}$"}, "A template's name."),
        "email": path("email", {"type": "string", **EmailAddress.json_schema},
                      "An email address."),
        "IdempotencyKey": {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": 255,
                       **NoControlChars().json_schema},
            "description": "The same key and body within 24 h answer the same 202; "
            "the same key with another body, 422 IdempotencyMismatch.",
        },
        "wait": {
            "name": "wait",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 30},
            "description": "Seconds to wait for the task to end (then 200).",
        },
    }


def _param(name: str) -> Schema:
    return {"$ref": f"#/components/parameters/{name}"}


def _json(description: str, schema: Schema) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _ref(name: str) -> Schema:
    return {"$ref": REF_PREFIX + name}


def _s(type_: str | list[str], **extra: Any) -> Schema:
    return {"type": type_, **extra}


# -- response bodies --------------------------------------------------------------------


def _response_schemas(config: Schema) -> dict[str, Schema]:
    addresses = {"type": "array", "items": _s("string")}
    time = _s("string", format="date-time")
    return {
        "Error": {
            "type": "object",
            "description": "Every error: {type, error, status} plus fields where said.",
            "required": ["type", "error", "status"],
            "properties": {
                "type": _s("string", examples=["ValidationError", "RateLimited", "Blocked"]),
                "error": _s("string"),
                "status": _s("integer"),
                "fields": {
                    "type": "object",
                    "description": "ValidationError: each bad field (nested as in the "
                    "request) with its messages.",
                    "examples": [{"connection": {"port": ["Must be a JSON integer."]}}],
                },
                "blocked": {**addresses, "description": "Blocked: the suppressed recipients."},
                "smtp_code": _s("integer"),
                "smtp_response": _s("string"),
            },
        },
        "SolutionConfigView": _config_view(config),
        "Solution": _obj(
            solution_id=_s("string"), created_at=time, config=_ref("SolutionConfigView")
        ),
        "SolutionCreated": _obj(
            solution_id=_s("string"),
            token=_s("string", description="The solution's bearer token; shown once."),
            config=_ref("SolutionConfigView"),
        ),
        "BatchResult": _batch_result(),
        "Accepted": _obj(
            task_id=_s("string"),
            state=_s("string", enum=["queued", "scheduled"]),
            links=_obj(self=_s("string", description="The task document's URL.")),
        ),
        "TaskDocument": _obj(
            task_id=_s("string"),
            solution_id=_s("string"),
            state=_s("string", enum=TASK_STATES),
            attempts=_s("integer", minimum=0),
            created_at=time,
            updated_at=time,
            next_attempt_at=_s(["string", "null"], format="date-time"),
            result={"anyOf": [_ref("TaskResult"), _s("null")]},
            error={"anyOf": [_ref("Error"), _s("null")]},
            pending={**addresses, "description": "Recipients deferred by a 4xx, still retried."},
        ),
        "TaskResult": _obj(
            status=_s("integer"),
            accepted=addresses,
            rejected=addresses,
            envelope=_obj(**{"from": _s("string"), "to": addresses}),
            response=_s("string", description="The server's reply to the end of DATA."),
            messageId=_s("string", description="The Message-ID header, with angle brackets."),
        ),
        "Quota": _obj(
            hLimit=_s("integer", minimum=0),
            hLimit_policy=_s("string", enum=["reject", "defer"]),
            remaining=_s("integer", minimum=0),
            retry_after=_s(
                ["number", "null"],
                description="Seconds until a token frees; null when hLimit is 0 (never).",
            ),
            reset_after=_s("number", minimum=0, description="Seconds until the bucket is full."),
        ),
        "Suppression": _obj(
            email=_s("string"),
            reason=_s("string", enum=["manual", "bounce", "complaint"]),
            created_at=time,
            expires_at=_s(["string", "null"], format="date-time", description="None: never."),
            detail=_s(["string", "null"], description="The bounce's reply or the event's text."),
        ),
        "SuppressionList": _obj(suppressions={"type": "array", "items": _ref("Suppression")}),
    }


def _batch_request(max_batch: int) -> Schema:
    return {
        "type": "object",
        "description": "Messages to send, each a send request judged on its own.",
        "required": ["messages"],
        "additionalProperties": False,
        "properties": {
            "messages": {
                "type": "array",
                "minItems": 1,
                "maxItems": max_batch,
                # each item is judged on its own: one that is not a BatchMessage is
                # refused in its own answer (status 400) and the others still go
                "items": {
                    "anyOf": [
                        _ref("BatchMessage"),
                        {"description": "Any other value: refused in its own answer "
                         "(status 400, fields naming what is wrong); the others still go."},
                    ]
                },
            }
        },
    }


def _batch_message(send_request: Schema) -> Schema:
    """A send request, with the message's own idempotency key."""
    message = copy.deepcopy(send_request)
    message["description"] = (
        "A message of a batch: a send request, and optionally its own idempotency key."
    )
    message.setdefault("properties", {})["idempotency_key"] = {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        **NoControlChars().json_schema,
        "description": "The same key and message within 24 h answer with the same task "
        "(queued once), as a single send's Idempotency-Key header.",
    }
    return message


def _batch_result() -> Schema:
    item = {
        "type": "object",
        "description": "One message's answer: status 202 with its task, or an error body "
        "(type, error, status and the fields its type adds).",
        "required": ["index", "status"],
        "properties": {
            "index": _s("integer", minimum=0, description="The message's place in messages."),
            "status": _s("integer"),
            "task_id": _s("string"),
            "state": _s("string", enum=["queued", "scheduled"]),
            "links": _obj(self=_s("string", description="The task document's URL.")),
            "type": _s("string"),
            "error": _s("string"),
            "fields": {"type": "object"},
            "blocked": {"type": "array", "items": _s("string")},
        },
    }
    return _obj(
        queued=_s("integer", minimum=0),
        refused=_s("integer", minimum=0),
        results={"type": "array", "items": item},
    )


def _obj(**properties: Schema) -> Schema:
    return {"type": "object", "required": list(properties), "properties": properties}


def _config_view(config: Schema) -> Schema:
    """The stored configuration as shown: the password replaced by whether one is set."""
    properties = copy.deepcopy(config["properties"])
    del properties["connection_password"]
    properties["connection_password_set"] = _s("boolean")
    for value in properties.values():
        value.pop("default", None)
    return {"type": "object", "required": list(properties), "properties": properties}


# -- richer messages: templates and cancel -------------------------------------------------


def _template_and_cancel_paths(paths: dict[str, Any], bodies: dict[str, Schema]) -> dict[str, Any]:
    """``paths`` with the template routes and the cancel of a task."""
    one = [_param("sid"), _param("template_name")]
    paths["/solutions/{sid}/tasks/{task_id}"]["delete"] = _op(
        "cancelTask",
        "email",
        "Cancel a scheduled task, or a queued one no worker has begun: 200 with the document "
        "in state canceled; 409 once it is sending or final.",
        {"200": _json("Canceled.", _ref("TaskDocument")), **_err(401, 404, 409)},
    )
    template = _ref("Template")
    return {
        **paths,
        "/solutions/{sid}/templates": {
            "parameters": [_param("sid")],
            "get": _op("listTemplates", "templates", "The solution's templates.",
                       {"200": _json("The templates.", _obj(templates={
                           "type": "array", "items": template})), **_err(401, 404)}),
        },
        "/solutions/{sid}/templates/{template_name}": {
            "parameters": one,
            "get": _op("getTemplate", "templates", "One template.",
                       {"200": _json("The template.", template), **_err(401, 404)}),
            "put": _op("putTemplate", "templates",
                       "Store a template (Jinja2; a syntax error is a 400 naming the part).",
                       {"200": _json("Replaced.", template), "201": _json("Created.", template),
                        **_err(400, 401, 404, 409)}, body=bodies["TemplatePut"]),
            "delete": _op("deleteTemplate", "templates", "Delete a template.",
                          {"204": {"description": "Deleted."}, **_err(401, 404)}),
        },
        "/solutions/{sid}/templates/{template_name}/render": {
            "parameters": one,
            "post": _op("renderTemplate", "templates",
                        "Render a template with data, without sending; a render error is a "
                        "400 naming template_data.",
                        {"200": _json("The rendered message.", _obj(
                            subject=_s("string"), text=_s(["string", "null"]),
                            html=_s(["string", "null"]))), **_err(400, 401, 404)},
                        body=bodies["RenderRequest"], body_required=False),
        },
    }  # fmt: skip


def _template_schemas() -> dict[str, Schema]:
    time = _s("string", format="date-time")
    return {
        "Template": _obj(
            name=_s("string"), subject=_s("string"), text=_s(["string", "null"]),
            html=_s(["string", "null"]), created_at=time, updated_at=time,
        ),
    }  # fmt: skip
