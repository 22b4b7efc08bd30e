"""The Lua scripts of ``shared/lua/``, run by EVALSHA alone or queued in a pipeline.

redis-py's own pipelined scripts ask ``SCRIPT EXISTS`` before every pipeline; these send
the EVALSHA as it is, and the caller loads the script when Redis answers NOSCRIPT (after a
restart: :meth:`Lua.__call__` does it for a script run alone, and a pipeline that met it
runs the script again alone).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

import redis
from redis.exceptions import NoScriptError

Args = Sequence[str | int | float]


class Lua:
    """One script, made of the files ``names`` of ``shared/lua/`` joined in that order (a
    preamble can prepare the keys and arguments of the script it comes before).

    Each file of ``functions`` comes first, as a local function of that name taking
    ``(KEYS, ARGV)``: a whole script, callable from the others with keys and arguments of
    their choosing (its ``return`` returns from the function)."""

    def __init__(self, *names: str, functions: Sequence[str] = ()) -> None:
        folder = resources.files("postroom.shared").joinpath("lua")
        self.names = names

        def text(name: str) -> str:
            return folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")

        parts = [f"local function {name}(KEYS, ARGV)\n{text(name)}\nend" for name in functions]
        self.source = "\n".join([*parts, *(text(name) for name in names)])
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    def function_text(self) -> str:
        """This script as a local function of its name taking ``(KEYS, ARGV)``, to join
        before another script (a script made of one file only)."""
        return f"local function {self.names[0]}(KEYS, ARGV)\n{self.source}\nend"

    def __call__(self, client: redis.Redis, script_keys: Args, args: Args) -> Any:
        try:
            return client.evalsha(self.sha, len(script_keys), *script_keys, *args)
        except NoScriptError:
            client.script_load(self.source)
            return client.evalsha(self.sha, len(script_keys), *script_keys, *args)

    def queue(self, pipe: Any, script_keys: Args, args: Args) -> None:
        pipe.evalsha(self.sha, len(script_keys), *script_keys, *args)


@cache
def script(*names: str, functions: tuple[str, ...] = ()) -> Lua:
    return Lua(*names, functions=functions)
