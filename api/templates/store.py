"""Message templates: stored per solution, rendered in Jinja2's immutable sandbox.

A template is ``{subject, text?, html?}``, each a Jinja2 source. It is compiled when it is
stored (a syntax error is the PUT's 400) and rendered at intake (a send naming it, or the
``render`` route), never in a worker: a render error is the send's 400 naming
``template_data``, and what the worker gets is plain subject, text and html.

Templates render in the bounded sandbox of :mod:`postroom.api.templates.sandbox` (``html``
autoescaped,
``subject`` and ``text`` not; an undefined variable is an error), and one render is bounded
too:

- its output is at most :data:`~postroom.api.templates.sandbox.MAX_OUTPUT_CHARS` characters, all
parts
  together, and it runs at most :data:`MAX_RENDER_S` seconds (a line tracer on the
  template's own frames checks the clock: a loop that produces nothing is stopped too);
- a source is compiled once per process (:func:`_compiled`, the 512 last used).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any

import redis
from jinja2 import Template, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from postroom.api.templates.sandbox import MAX_OUTPUT_CHARS, environment
from postroom.shared import keys

PARTS = ("subject", "text", "html")
#: the longest one render may run
MAX_RENDER_S = 0.5
#: the most templates a solution may keep
MAX_TEMPLATES = 500


class RenderError(Exception):
    """A template that does not render with the given data (the message says why)."""


class RenderTooLong(RenderError):
    pass


_PLAIN = environment(autoescape=False)
_HTML = environment(autoescape=True)


def _env(part: str) -> ImmutableSandboxedEnvironment:
    return _HTML if part == "html" else _PLAIN


def check_syntax(part: str, source: str) -> str | None:
    """Why ``source`` does not compile as the template's ``part``, or None."""
    try:
        _env(part).parse(source)
    except TemplateSyntaxError as exc:
        return f"line {exc.lineno}: {exc.message}"
    return None


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str | None
    html: str | None

    def as_dict(self) -> dict[str, str | None]:
        return {"subject": self.subject, "text": self.text, "html": self.html}


def render(template: Mapping[str, Any], data: Mapping[str, Any]) -> Rendered:
    """Each part of ``template`` rendered with ``data``; RenderError when one does not
    (undefined variable, sandbox refusal, type error, too long or too large)."""
    deadline = time.monotonic() + MAX_RENDER_S
    budget = [MAX_OUTPUT_CHARS]
    out: dict[str, str | None] = {}
    for part in PARTS:
        source = template.get(part)
        out[part] = None if source is None else _render_one(part, source, data, deadline,
                                                           budget)  # fmt: skip
    return Rendered(out["subject"] or "", out["text"], out["html"])


@functools.lru_cache(maxsize=512)
def _compiled(part: str, source: str) -> Template:
    """A source compiled once per process (compiling costs far more than a render)."""
    return _env(part).from_string(source)


def _render_one(part: str, source: str, data: Mapping[str, Any], deadline: float,
                budget: list[int]) -> str:  # fmt: skip
    try:
        compiled = _compiled(part, source)
        chunks = _bounded(compiled.generate(dict(data)), budget, part)
        return "".join(_traced(chunks, deadline))
    except RenderError:
        raise
    except SecurityError as exc:
        raise RenderError(f"{part}: refused by the sandbox: {exc}") from None
    except TemplateError as exc:
        raise RenderError(f"{part}: {exc.message or type(exc).__name__}") from None
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError,
            RecursionError, OverflowError) as exc:  # fmt: skip
        raise RenderError(f"{part}: {type(exc).__name__}: {exc}"[:300]) from None


def _bounded(chunks: Iterable[str], budget: list[int], part: str) -> Iterable[str]:
    for chunk in chunks:
        budget[0] -= len(chunk)
        if budget[0] < 0:
            raise RenderTooLong(f"{part}: the output passes {MAX_OUTPUT_CHARS} characters")
        yield chunk


def _traced(chunks: Iterable[str], deadline: float) -> Iterable[str]:
    """``chunks`` drawn with a tracer that stops the template's code past ``deadline``.

    Only frames of compiled templates (file name ``<template>``) are traced line by line;
    the tracer already set (a debugger, coverage) is put back after each chunk."""

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" and time.monotonic() > deadline:
            raise RenderTooLong(f"the render passes {MAX_RENDER_S} s")
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename == "<template>":
            return local(frame, event, arg)
        return None

    iterator = iter(chunks)
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        while True:
            try:
                chunk = next(iterator)
            except StopIteration:
                return
            sys.settrace(previous)
            yield chunk
            sys.settrace(tracer)
    finally:
        sys.settrace(previous)


# -- the store ---------------------------------------------------------------------------


class TemplateStore:
    """A solution's templates: one hash (``keys.templates(sid)``), name -> JSON
    ``{name, subject, text, html, created_at, updated_at}``."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client

    def get(self, sid: str, name: str) -> dict[str, Any] | None:
        raw = self._r.hget(keys.templates(sid), name)
        return None if raw is None else dict(json.loads(raw))

    def list(self, sid: str) -> list[dict[str, Any]]:
        raw = self._r.hgetall(keys.templates(sid))
        found = [json.loads(v) for v in raw.values()]
        return sorted(found, key=lambda t: str(t["name"]))

    def count(self, sid: str) -> int:
        return int(self._r.hlen(keys.templates(sid)))

    def put(self, sid: str, name: str, parts: Mapping[str, str | None]) -> tuple[dict[str, Any],
                                                                                bool]:
        """Store the template; it and whether it is new."""
        now = time.time()
        earlier = self.get(sid, name)
        record = {
            "name": name,
            **{part: parts.get(part) for part in PARTS},
            "created_at": now if earlier is None else earlier["created_at"],
            "updated_at": now,
        }
        self._r.hset(keys.templates(sid), name, json.dumps(record))
        return record, earlier is None

    def delete(self, sid: str, name: str) -> bool:
        return bool(self._r.hdel(keys.templates(sid), name))
