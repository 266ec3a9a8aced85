"""Templates: a value built from an event (``"{a}.{b}"``, ``"{a.b}"``, ``"{x}"``).

Split out of ``routing`` (which compiles whole routes from them). Like the rest
of routing, a template is compiled once, at load, into a closure, so rendering
one for an event does no parsing and no dispatching.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson

from ..exceptions import EventError
from ..poison import scalar_text, short

__all__ = ["Event", "Getter", "Template"]

Event = Mapping[str, Any]
"""One decoded JSON object."""

Getter = Callable[[Event], Any]


def _text(value: Any) -> str:
    """A field's value as it reads inside a string: JSON spelling, not Python's, so
    that ``{"a": true}`` makes ``"true"`` in an id, as any other JSON tool would."""
    cls = value.__class__
    if cls is str:
        return value  # type: ignore[no-any-return]
    if cls is int or cls is float:
        return repr(value)
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _short(value: Any, limit: int = 60) -> str:
    return short(value, limit)


def _parse(source: str) -> list[str | tuple[str, ...]]:
    """Split a template into literal text and field paths.

    Raises:
        ValueError: on an unbalanced brace or an empty placeholder or field name.
    """
    parts: list[str | tuple[str, ...]] = []
    literal: list[str] = []
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c == "{":
            if source.startswith("{{", i):
                literal.append("{")
                i += 2
                continue
            end = source.find("}", i + 1)
            if end < 0 or "{" in source[i + 1 : end]:
                raise ValueError(f"template {source!r} has an unbalanced brace")
            name = source[i + 1 : end]
            if not name:
                raise ValueError(f"template {source!r} has an empty placeholder '{{}}'")
            path = tuple(name.split("."))
            if not all(path):
                raise ValueError(f"template {source!r} has an empty field name in {{{name}}}")
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(path)
            i = end + 1
        elif c == "}":
            if not source.startswith("}}", i):
                raise ValueError(f"template {source!r} has an unbalanced brace")
            literal.append("}")
            i += 2
        else:
            literal.append(c)
            i += 1
    if literal:
        parts.append("".join(literal))
    return parts


def _getter(path: tuple[str, ...]) -> Getter:
    """A function returning the field at ``path``, or raising ``EventError``.

    try/except costs nothing when nothing is raised (Python 3.11+), and a missing
    field is the exception: it sends the event to the dead-letter file.
    """
    missing = f"missing field {'.'.join(path)!r}"
    if len(path) == 1:
        (key,) = path

        def get(event: Event) -> Any:
            try:
                return event[key]
            except (KeyError, TypeError):
                raise EventError(missing) from None

        return get

    def get_nested(event: Event) -> Any:
        value: Any = event
        try:
            for key in path:
                value = value[key]
        except (KeyError, TypeError, IndexError):
            raise EventError(missing) from None
        return value

    return get_nested


class Template:
    """A value built from an event: ``"{a}.{b}"``, ``"{a.b}"``, ``"{x}"`` or a constant.

    Exactly ``"{field}"`` yields the field as it is in the JSON (an int stays an
    int); any text around placeholders makes a string. ``{{`` and ``}}`` are
    literal braces. A source that is not a string (``1`` in a doc) is a constant.

    Two compiled functions are exposed as attributes, chosen at construction so
    that calling them does no dispatching:

    - ``render(event)``: the value, JSON type kept for a whole-field template;
    - ``text(event)``: the value as a string (ids and doc keys need one).

    Both raise ``EventError("missing field 'a.b'")`` when the event lacks a field;
    ``text`` also when a field is null, an object or a list (``poison``): a key
    or column name made of one would be ``"null"`` or a JSON document.

    Args:
        source: the template as written in the config.

    Raises:
        ValueError: the template is malformed (unbalanced brace, empty ``{}``).
    """

    __slots__ = ("source", "fields", "key", "render", "text")

    source: Any
    fields: tuple[str, ...]
    """Dotted names of the fields the template reads, in order."""
    key: str | None
    """For exactly ``"{name}"`` (one top-level field), ``name``: builders that
    see it look the field up themselves instead of calling ``render``."""
    render: Getter
    text: Callable[[Event], str]

    def __init__(self, source: Any) -> None:
        self.source = source
        self.key = None
        if not isinstance(source, str):
            self.fields = ()
            self.render, self.text = _constant(source), _constant(_text(source))
            return
        parts = _parse(source)
        paths = [p for p in parts if isinstance(p, tuple)]
        self.fields = tuple(".".join(p) for p in paths)
        if not paths:
            constant = "".join(p for p in parts if isinstance(p, str))
            self.render = self.text = _constant(constant)
        elif len(parts) == 1:
            if len(paths[0]) == 1:
                self.key = paths[0][0]
            get = _getter(paths[0])
            self.render = get
            self.text = _as_text(get, self.fields[0])
        else:
            self.render = self.text = _joined(parts)

    @property
    def is_constant(self) -> bool:
        """True when no event field is read (the same value for every event)."""
        return not self.fields

    @property
    def is_whole_field(self) -> bool:
        """True for exactly ``"{field}"``: the only form that can yield a non-string."""
        return (
            isinstance(self.source, str)
            and len(self.fields) == 1
            and (self.source == "{" + self.fields[0] + "}")
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Template):
            return NotImplemented
        return type(self.source) is type(other.source) and self.source == other.source

    def __hash__(self) -> int:
        return hash((type(self.source), self.source))

    def __repr__(self) -> str:
        return f"Template({self.source!r})"


def _constant(value: Any) -> Getter:
    def constant(event: Event) -> Any:
        return value

    return constant


def _as_text(get: Getter, field: str) -> Callable[[Event], str]:
    def text(event: Event) -> str:
        value = get(event)
        return value if value.__class__ is str else scalar_text(value, field)

    return text


def _missing(error: KeyError) -> EventError:
    """The dead-letter reason for a top-level lookup that failed: ``KeyError``
    carries the key, so the fast paths need not remember which field they read."""
    return EventError(f"missing field {error.args[0]!r}")


def _joined(parts: list[str | tuple[str, ...]]) -> Callable[[Event], str]:
    """Text with placeholders: literals kept as they are, fields fetched and
    turned into text, the whole joined once."""
    if all(isinstance(p, str) or len(p) == 1 for p in parts):
        # Top-level fields only (the usual "{a}.{b}"): look them up inline, with
        # one try around the lot, rather than through a function per field.
        steps: list[tuple[str, str]] = []
        literal = ""
        for part in parts:
            if isinstance(part, str):
                literal = part
            else:
                steps.append((literal, part[0]))
                literal = ""
        fields, tail = tuple(steps), literal

        def joined_fields(event: Event) -> str:
            # Every field is looked up before any is turned into text, so a missing
            # field is reported before a null one (as the generated route does).
            try:
                values = [event[key] for _, key in fields]
            except KeyError as e:
                raise _missing(e) from None
            out = []
            for (literal, key), value in zip(fields, values):
                if literal:
                    out.append(literal)
                cls = value.__class__  # ids are mostly made of strs and ints
                out.append(
                    value if cls is str else repr(value) if cls is int else scalar_text(value, key)
                )
            if tail:
                out.append(tail)
            return "".join(out)

        return joined_fields

    pieces = tuple(p if isinstance(p, str) else _as_text(_getter(p), ".".join(p)) for p in parts)

    def joined(event: Event) -> str:
        return "".join([p if p.__class__ is str else p(event) for p in pieces])  # type: ignore[operator]

    return joined
