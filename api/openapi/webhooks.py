"""The OpenAPI parts of the delivery events (webhooks) and of the task list, joined into
the document by :func:`postroom.api.openapi.spec.build_spec`."""

from __future__ import annotations

from typing import Any

from postroom.api.tasklist import CURSOR_PATTERN
from postroom.shared.documents import STATES
from postroom.shared.events import ALL, EVENT_TYPES
from postroom.shared.schemas.json_schema import REF_PREFIX, Converter
from postroom.shared.schemas.webhooks import WebhookCreateSchema, WebhookPatchSchema

JSON = "application/json"
Schema = dict[str, Any]

EVENTS_DESCRIPTION = (
    "Each event is POSTed as JSON {type, timestamp, data} with the Standard Webhooks headers "
    "webhook-id (the same on every retry of one event), webhook-timestamp (Unix seconds) and "
    "webhook-signature (v1,<base64 HMAC-SHA256 of '{webhook-id}.{webhook-timestamp}.{body}' "
    "keyed with the secret's base64-decoded bytes after 'whsec_'; two signatures, "
    "space-separated, for 24 h after a rotation). A 2xx within POSTROOM_WEBHOOK_TIMEOUT_S "
    "(10 s) is delivered; anything else is retried after POSTROOM_WEBHOOK_RETRY_BASE_S x "
    "4^(n-1) s (5 s, 20 s, 80 s, 5 min, 21 min, 85 min, 5.7 h; +-20 % jitter), at most "
    "POSTROOM_WEBHOOK_MAX_ATTEMPTS (8) times. For email.* events data is the task document "
    "at that moment, with the send's metadata."
)


def paths(param: Any, op: Any, err: Any, json_: Any, ref: Any,
          bodies: dict[str, Schema]) -> dict[str, Any]:  # fmt: skip
    """The routes; ``param``, ``op``, ``err``, ``json_`` and ``ref`` are the document's own
    helpers (so every operation reads as the others)."""
    sid = [param("sid")]
    one = [param("sid"), param("webhook_id")]
    endpoint = ref("Webhook")
    created = json_("Created.", ref("WebhookCreated"))
    created["links"] = {  # what a client (or a stateful fuzzer) does next with the new id
        name: {"operationId": target,
               "parameters": {"sid": "$request.path.sid", "webhook_id": "$response.body#/id"}}
        for name, target in (("GetWebhook", "getWebhook"), ("UpdateWebhook", "updateWebhook"),
                             ("DeleteWebhook", "deleteWebhook"), ("TestWebhook", "testWebhook"),
                             ("RotateWebhookSecret", "rotateWebhookSecret"),
                             ("ListWebhookDeliveries", "listWebhookDeliveries"))
    }  # fmt: skip
    return {
        "/solutions/{sid}/tasks": {
            "parameters": sid,
            "get": op(
                "listTasks",
                "email",
                "The solution's tasks, newest first, filtered by state and recipient, paged "
                "by next_cursor (null on the last page; a page may hold fewer than limit).",
                {"200": json_("A page of task documents.", ref("TaskList")), **err(400, 401, 404)},
                parameters=[param("state"), param("recipient"), param("limit"),
                            param("cursor")],
            ),
        },
        "/solutions/{sid}/webhooks": {
            "parameters": sid,
            "get": op("listWebhooks", "webhooks", "The solution's webhook endpoints.",
                      {"200": json_("The endpoints.", ref("WebhookList")), **err(401, 404)}),
            "post": op(
                "createWebhook",
                "webhooks",
                "Add an endpoint; its secret is in this answer only. " + EVENTS_DESCRIPTION,
                {"201": created, **err(400, 401, 404, 409)},
                body=bodies["WebhookCreate"],
            ),
        },
        "/solutions/{sid}/webhooks/{webhook_id}": {
            "parameters": one,
            "get": op("getWebhook", "webhooks", "One endpoint (never its secret).",
                      {"200": json_("The endpoint.", endpoint), **err(401, 404)}),
            "patch": op(
                "updateWebhook",
                "webhooks",
                "Change url, events, description or enabled (true also clears an automatic "
                "disabling).",
                {"200": json_("The endpoint.", endpoint), **err(400, 401, 404)},
                body=bodies["WebhookPatch"],
            ),
            "delete": op("deleteWebhook", "webhooks",
                         "Remove the endpoint, its undelivered events and its log.",
                         {"204": {"description": "Removed."}, **err(401, 404)}),
        },
        "/solutions/{sid}/webhooks/{webhook_id}/test": {
            "parameters": one,
            "post": op("testWebhook", "webhooks",
                       "Queue one webhook.test event for this endpoint now (a disabled "
                       "endpoint gets it once enabled).",
                       {"202": json_("Queued.", ref("WebhookTestQueued")), **err(401, 404)}),
        },
        "/solutions/{sid}/webhooks/{webhook_id}/rotate-secret": {
            "parameters": one,
            "post": op("rotateWebhookSecret", "webhooks",
                       "A new secret (in this answer only); the previous one keeps signing "
                       "beside it for 24 h.",
                       {"200": json_("The new secret.", ref("WebhookSecret")),
                        **err(401, 404)}),
        },
        "/solutions/{sid}/webhooks/{webhook_id}/deliveries": {
            "parameters": one,
            "get": op("listWebhookDeliveries", "webhooks",
                      "The endpoint's last 100 delivery attempts, newest first.",
                      {"200": json_("The log.", ref("WebhookDeliveries")), **err(401, 404)}),
        },
    }


def bodies(conv: Converter) -> dict[str, Schema]:
    return {
        "WebhookCreate": conv.ref(WebhookCreateSchema(), "WebhookCreate"),
        "WebhookPatch": conv.ref(WebhookPatchSchema(), "WebhookPatch"),
    }


def parameters() -> dict[str, Any]:
    def query(name: str, schema: Schema, text: str) -> Schema:
        return {"name": name, "in": "query", "required": False, "schema": schema,
                "description": text}

    return {
        "webhook_id": {"name": "webhook_id", "in": "path", "required": True,
                       "schema": {"type": "string"}, "description": "Webhook endpoint id."},
        "state": query("state", {"type": "string", "enum": list(STATES)},
                       "Only tasks in this state."),
        "recipient": query("recipient", {"type": "string", "format": "email"},
                           "Only tasks to this address (to, cc or bcc; any case)."),
        "limit": query("limit", {"type": "integer", "minimum": 1, "maximum": 100,
                                 "default": 20}, "Tasks per page."),
        "cursor": query("cursor", {"type": "string", "pattern": CURSOR_PATTERN},
                        "next_cursor of the previous page."),
    }


def components() -> dict[str, Schema]:
    def s(type_: str | list[str], **extra: Any) -> Schema:
        return {"type": type_, **extra}

    def obj(**properties: Schema) -> Schema:
        return {"type": "object", "required": list(properties), "properties": properties}

    def ref(name: str) -> Schema:
        return {"$ref": REF_PREFIX + name}

    time = s("string", format="date-time")
    maybe_time = s(["string", "null"], format="date-time")
    webhook = obj(
        id=s("string"),
        url=s("string"),
        events={"type": "array", "items": s("string", enum=[ALL, *EVENT_TYPES])},
        description=s(["string", "null"]),
        enabled=s("boolean"),
        created_at=time,
        disabled_reason=s(["string", "null"], description='"failing": every delivery failed '
                          "for POSTROOM_WEBHOOK_DISABLE_AFTER_S (24 h)."),
        disabled_at=maybe_time,
        failing_since=maybe_time,
    )
    shown = {**webhook, "properties": {**webhook["properties"],
                                        "pending": s("integer", minimum=0,
                                                     description="Events not yet delivered.")}}
    created = {**webhook, "required": [*webhook["required"], "secret"],
               "properties": {**webhook["properties"], "secret": s(
                   "string", description="whsec_ + base64 of 32 random bytes; shown once.")}}
    return {
        "Webhook": shown,
        "WebhookCreated": created,
        "WebhookList": obj(webhooks={"type": "array", "items": ref("Webhook")}),
        "WebhookSecret": obj(secret=s("string")),
        "WebhookTestQueued": obj(queued=s("boolean"), type=s("string")),
        "WebhookDeliveries": obj(deliveries={"type": "array", "items": obj(
            id=s("string"), event_id=s("string", description="The event's webhook-id."),
            type=s("string"), attempt=s("integer", minimum=1),
            status_code=s(["integer", "null"], description="null: no answer."),
            error=s(["string", "null"]), at=time)}),
        "TaskList": obj(tasks={"type": "array", "items": ref("TaskDocument")},
                        next_cursor=s(["string", "null"])),
        "WebhookEvent": {
            "type": "object",
            "description": EVENTS_DESCRIPTION,
            "required": ["type", "timestamp", "data"],
            "properties": {"type": s("string", enum=list(EVENT_TYPES)), "timestamp": time,
                           "data": {"type": "object"}},
        },
    }


METADATA = {
    "type": "object",
    "description": "The send's metadata ({} when none was given).",
    "additionalProperties": {"type": "string"},
}
