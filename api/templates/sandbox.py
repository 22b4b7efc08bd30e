"""The Jinja2 environment templates render in: the immutable sandbox, bounded.

Jinja2's :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` refuses attribute access to
internals (``__class__``, ``__mro__``, ``__globals__`` …) and calls that modify data. It
does not bound what a template may make: ``'x' * 10**9``, ``'x'|center(10**9)`` or
``'{:>1000000000}'.format(1)`` would have the API allocate a gigabyte before any output
check could look. Here what makes a big value out of small ones is refused before it
allocates anything:

- ``*``, ``**``, ``+`` and ``~`` on strings, lists and numbers, ``join`` and ``replace``
  (filters and methods), and ``str.format`` (no width or precision of 1,000 or more);
- numbers given to filters and methods are at most 10,000 (so ``range`` goes to 10,000);
- the filters and methods that pad or repeat by a number (``center``, ``indent``,
  ``wordwrap``, ``format``, ``slice``, ``pprint``; ``ljust``, ``rjust``, ``zfill``,
  ``expandtabs`` …) and ``%`` on strings are not available;
- a printed value (and ``string``, ``tojson``, ``list``) is measured before it is turned
  into text.

A variable the data does not define is an error (``StrictUndefined``).
:mod:`postroom.api.templates.store`
adds the limits of one render: its output and its time.

``~`` is bounded by extending Jinja2's code generator (:class:`_Generator`), an internal
of Jinja2: written for 3.1 (pinned in ``pyproject.toml``) and held to it by the tests of
``tests/test_richer_api.py`` (a template doubling a string with ``~``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import Any

from jinja2 import StrictUndefined, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

#: the most characters a value in a template, or one render's output, may have
MAX_OUTPUT_CHARS = 2 * 1024 * 1024
_MAX_REPEAT = 100_000  # the longest a string or list may grow by * in a template
_MAX_EXPONENT = 64  # the largest exponent of ** in a template
_MAX_ARG = 10_000  # the largest number a filter or method call may be given
#: filters whose output grows with a number argument (widths, counts): left out
_REFUSED_FILTERS = ("center", "indent", "wordwrap", "format", "slice", "pprint")
#: str methods left out for the same reason (str.format is bounded instead)
_REFUSED_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "format_map",
                              "translate", "maketrans", "encode"})  # fmt: skip
_BIG_SPEC = re.compile(r"[:!][^{}]*(\d{4,}|\*)")


class _Generator(CodeGenerator):
    """Jinja2's code generator, with ``~`` (concatenation) bounded before it joins."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            func_name = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            func_name = "markup_join"
        else:
            func_name = "str_join"
        self.write(f"{func_name}(environment.bounded_parts((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(")))")


def _refuse(what: str) -> SecurityError:
    return SecurityError(f"{what} is not allowed in a template")


def _size(value: Any, depth: int = 0) -> int:
    """About how many characters ``value`` prints as, found without printing it."""
    if isinstance(value, str):
        return len(value)
    if depth > 16:
        return 0
    if isinstance(value, list | tuple | set | frozenset):
        return 2 + sum(_size(v, depth + 1) + 2 for v in value)
    if isinstance(value, dict):
        return 2 + sum(_size(k, depth + 1) + _size(v, depth + 1) + 4 for k, v in value.items())
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    return 32


def _finalize(value: Any) -> Any:
    """Every printed value, before it is turned into text."""
    _check_size(_size(value))
    return value


def _check_size(size: int) -> None:
    if size > MAX_OUTPUT_CHARS:
        raise SecurityError(f"a value in the template would pass {MAX_OUTPUT_CHARS} characters")


def _check_int_args(values: Iterable[Any]) -> None:
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_ARG:
            raise SecurityError(f"numbers given to filters and methods are at most {_MAX_ARG}")


def _bounded_filter(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` refusing numeric arguments (after the value) above :data:`_MAX_ARG`."""
    skip = 2 if getattr(func, "jinja_pass_arg", None) is not None else 1

    @functools.wraps(func)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_int_args(args[skip:])
        _check_int_args(kwargs.values())
        return func(*args, **kwargs)

    return bounded


def _checked_value(func: Callable[..., Any]) -> Callable[..., Any]:
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)
    def checked(*args: Any, **kwargs: Any) -> Any:
        _check_size(_size(args[skip]))
        return func(*args, **kwargs)

    return checked


def _join_check(separator: Any, items: Iterable[Any]) -> list[Any]:
    listed = list(items)
    _check_size(_size(separator) * len(listed) + sum(_size(x) for x in listed))
    return listed


def _replace_check(text: Any, old: Any, new: Any) -> None:
    text, old, new = str(text), str(old), str(new)
    occurrences = text.count(old) if old else len(text) + 1
    _check_size(len(text) + occurrences * len(new))


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox with what makes big values out of small ones bounded."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _Generator

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in _REFUSED_FILTERS:
            self.filters.pop(name, None)
        join, replace, total = self.filters["join"], self.filters["replace"], self.filters["sum"]

        @functools.wraps(join)
        def bounded_join(ctx: Any, value: Any, d: str = "", attribute: Any = None) -> Any:
            return join(ctx, _join_check(d, value), d, attribute)

        @functools.wraps(replace)
        def bounded_replace(ctx: Any, s: Any, old: Any, new: Any, count: Any = None) -> Any:
            _replace_check(s, old, new)
            return replace(ctx, s, old, new, count)

        @functools.wraps(total)
        def numbers_sum(ctx: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
            if not isinstance(start, int | float):
                raise _refuse("sum of other than numbers")
            return total(ctx, iterable, attribute, start)

        self.filters.update(join=bounded_join, replace=bounded_replace, sum=numbers_sum)
        for name in ("string", "tojson", "list"):  # they print or copy their value whole
            self.filters[name] = _checked_value(self.filters[name])
        self.filters = {name: _bounded_filter(f) for name, f in self.filters.items()}

    def bounded_parts(self, parts: tuple[Any, ...]) -> tuple[Any, ...]:
        _check_size(sum(_size(p) for p in parts))
        return parts

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and attr in _REFUSED_METHODS:
            return False
        return bool(super().is_safe_attribute(obj, attr, value))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        _check_int_args(args)
        _check_int_args(kwargs.values())
        if isinstance(owner, str):
            if name == "join" and args:
                args = (_join_check(owner, args[0]), *args[1:])
            elif name == "replace" and len(args) >= 2:
                _replace_check(owner, args[0], args[1])
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        owner = getattr(value, "__self__", None)
        wrapped = super().wrap_str_format(value)
        if wrapped is None or not isinstance(owner, str):
            return wrapped
        if _BIG_SPEC.search(owner):
            raise _refuse("a format width or precision of 1000 or more")

        def bounded(*args: Any, **kwargs: Any) -> str:
            biggest = max((_size(a) for a in (*args, *kwargs.values())), default=0)
            _check_size(len(owner) + owner.count("{") * biggest)
            return wrapped(*args, **kwargs)

        return bounded

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int):
                    if len(seq) * times > _MAX_REPEAT:
                        raise SecurityError("a repetition in the template is too long")
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > 4096:
                    raise SecurityError("a product in the template is too large")
            return left * right
        if operator == "**":
            if not isinstance(right, int | float) or abs(right) > _MAX_EXPONENT:
                raise SecurityError(f"** takes exponents up to {_MAX_EXPONENT} here")
            if isinstance(left, int) and left.bit_length() * abs(right) > 4096:
                raise SecurityError("a power in the template is too large")
            return left**right
        if operator == "+":
            if isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
                _check_size(len(left) + len(right))
            return left + right
        if operator == "%":
            if isinstance(left, str):
                raise _refuse("% formatting (use ~ to join text)")
            return left % right
        return super().call_binop(context, operator, left, right)


def environment(autoescape: bool) -> _Sandbox:
    """A bounded sandbox; ``autoescape`` for HTML."""
    return _Sandbox(autoescape=autoescape, undefined=StrictUndefined, finalize=_finalize,
                    keep_trailing_newline=True)  # fmt: skip
