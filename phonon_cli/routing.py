"""From an event to the updates it feeds: filters, templates and routes.

Everything a route needs is compiled once, when the config is loaded, into small
closures, so that routing one event is a handful of dict lookups: no template is
parsed, no regex run and no exception raised on the common path. This runs once
per event, millions of times, so the choices below favour the per-event cost over
elegance of the compiled form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .exceptions import EventError

if TYPE_CHECKING:
    from .update import Update

Event = Mapping[str, Any]
"""One decoded JSON object."""

Getter = Callable[[Event], Any]

Scalar = str | int | float | bool | None
"""What a ``when`` filter compares a field with."""

_MISSING: Any = object()
"""Stands for an absent field where ``None`` (JSON null) is a legitimate value."""


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
    """``repr`` cut short: error messages end up in dead-letter files, one per line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _probe(path: tuple[str, ...]) -> Getter:
    """Like ``_getter`` but returns ``_MISSING`` instead of raising: for filters,
    where an absent field simply means "no match"."""
    if len(path) == 1:
        (key,) = path

        def probe(event: Event) -> Any:
            return event.get(key, _MISSING)

        return probe

    def probe_nested(event: Event) -> Any:
        value: Any = event
        for key in path:
            if value.__class__ is not dict:
                return _MISSING
            value = value.get(key, _MISSING)
        return value

    return probe_nested


class Template:
    """A value built from an event: ``"{a}.{b}"``, ``"{a.b}"``, ``"{x}"`` or a constant.

    Exactly ``"{field}"`` yields the field as it is in the JSON (an int stays an
    int); any text around placeholders makes a string. ``{{`` and ``}}`` are
    literal braces. A source that is not a string (``1`` in a doc) is a constant.

    Two compiled functions are exposed as attributes, chosen at construction so
    that calling them does no dispatching:

    - ``render(event)``: the value, JSON type kept for a whole-field template;
    - ``text(event)``: the value as a string (ids and doc keys need one).

    Both raise ``EventError("missing field 'a.b'")`` when the event lacks a field.

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
            self.text = _as_text(get)
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


def _as_text(get: Getter) -> Callable[[Event], str]:
    def text(event: Event) -> str:
        value = get(event)
        return value if value.__class__ is str else _text(value)

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
            out = []
            try:
                for literal, key in fields:
                    if literal:
                        out.append(literal)
                    value = event[key]
                    cls = value.__class__  # ids are mostly made of strs and ints
                    out.append(value if cls is str else repr(value) if cls is int else _text(value))
            except KeyError as e:
                raise _missing(e) from None
            if tail:
                out.append(tail)
            return "".join(out)

        return joined_fields

    pieces = tuple(p if isinstance(p, str) else _as_text(_getter(p)) for p in parts)

    def joined(event: Event) -> str:
        return "".join([p if p.__class__ is str else p(event) for p in pieces])  # type: ignore[operator]

    return joined


# -- filters --------------------------------------------------------------------------


def _same(value: Any, wanted: Any) -> bool:
    """JSON equality: ``true`` is not ``1``, though Python says ``True == 1``."""
    return bool(value == wanted) and (value.__class__ is bool) == (wanted.__class__ is bool)


def _condition(path: tuple[str, ...], allowed: tuple[Scalar, ...]) -> Callable[[Event], bool]:
    """A test of one field against the value(s) a ``when`` filter allows."""
    probe = _probe(path)
    if all(a.__class__ is str for a in allowed):
        # The common case (event types, names): a str compares with str only, so
        # a hash lookup decides; the class test keeps unhashable values out of it.
        if len(allowed) == 1 and len(path) == 1:
            (key,), (wanted,) = path, allowed
            return lambda event: event.get(key) == wanted
        strings = frozenset(allowed)
        if len(path) == 1:
            (key,) = path
            # A missing field gives None, which is not a str: no match, no sentinel.
            return lambda event: (v := event.get(key)).__class__ is str and v in strings
        return lambda event: (v := probe(event)).__class__ is str and v in strings

    def test(event: Event) -> bool:
        value = probe(event)
        if value is _MISSING:
            return False
        return any(_same(value, a) for a in allowed)

    return test


# -- routes ---------------------------------------------------------------------------


Built = tuple[str, dict[str, Any], dict[str, Any]]
"""What a route makes of an event: the id, the spec and the doc."""

Routed = tuple["Route", str, dict[str, Any], dict[str, Any]]
"""One entry of ``Router.route``: the route, the id, the spec and the doc."""


@dataclass(frozen=True, slots=True)
class Route:
    """Which events feed which ``Update`` class, and how to key and fill it.

    Construct it with templates already compiled (``Config`` does this from a
    file); everything the hot path calls is derived in ``__post_init__``.

    Attributes:
        update: the ``Update`` subclass to build.
        update_path: ``update`` as written in the config (for messages).
        id: the key's template; always rendered as a string.
        when: dotted field path -> values, any of which matches; every field
            must match. Empty: every event matches.
        collection, database: passed to the update as they are.
        spec: name -> template: what identifies the record in the database.
        doc: template of a key -> template of a number: what gets aggregated.
        soft_session_s, hard_session_s: per-route session lengths in seconds;
            None means the global ones (``CacheConfig``).
    """

    update: type[Update]
    update_path: str
    id: Template
    when: Mapping[str, tuple[Scalar, ...]] = field(default_factory=dict, hash=False)
    collection: str | None = None
    database: str | None = None
    spec: Mapping[str, Template] = field(default_factory=dict, hash=False)
    doc: Mapping[Template, Template] = field(default_factory=dict, hash=False)
    soft_session_s: float | None = None
    hard_session_s: float | None = None

    _match: Callable[[Event], bool] | None = field(
        init=False, repr=False, compare=False, hash=False
    )
    """The compiled ``when``; None when there is none (no call at all then)."""
    _entry: Callable[[Event], Routed] = field(init=False, repr=False, compare=False, hash=False)
    """The compiled ``build``, returning the ``Router.route`` entry directly."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: the derived fields are set once, here
        set_(self, "_match", _matcher(self.when))
        route, id_text = self, self.id.text
        spec, doc = _spec_builder(self.spec), _doc_builder(self.doc)

        def entry(event: Event) -> Routed:
            return route, id_text(event), spec(event), doc(event)

        set_(self, "_entry", entry)

    def matches(self, event: Event) -> bool:
        """True when every ``when`` field is present and equals one of its values."""
        return self._match is None or self._match(event)

    def build(self, event: Event) -> Built:
        """The id (a string), spec and doc this route makes of ``event``.

        Raises:
            EventError: a field is missing, or a doc value is not a number.
        """
        _, id_, spec, doc = self._entry(event)
        return id_, spec, doc


def _matcher(when: Mapping[str, tuple[Scalar, ...]]) -> Callable[[Event], bool] | None:
    tests = tuple(
        # A bare value (a Route built by hand) is one allowed value, not a sequence.
        _condition(tuple(path.split(".")), tuple(v) if isinstance(v, (list, tuple)) else (v,))
        for path, v in when.items()
    )
    if not tests:
        return None
    if len(tests) == 1:
        return tests[0]

    def all_match(event: Event) -> bool:
        for test in tests:
            if not test(event):
                return False
        return True

    return all_match


def _spec_builder(spec: Mapping[str, Template]) -> Callable[[Event], dict[str, Any]]:
    if not spec:
        return lambda event: {}
    keys = tuple((name, t.key) for name, t in spec.items())
    if all(key is not None for _, key in keys):
        # Every value is a top-level field, as spec usually is: plain lookups.
        def lookup(event: Event) -> dict[str, Any]:
            try:
                return {name: event[key] for name, key in keys}  # type: ignore[index]
            except KeyError as e:
                raise _missing(e) from None

        return lookup
    renders = tuple((name, t.render) for name, t in spec.items())
    return lambda event: {name: render(event) for name, render in renders}


def _doc_value(key: Callable[[Event], str], value: Template) -> Getter:
    """The doc value's renderer; a template's result is checked to be a number,
    a constant was checked when the config was loaded."""
    if value.is_constant:
        return value.render
    render = value.render

    def number(event: Event) -> Any:
        v = render(event)
        if v.__class__ is int or v.__class__ is float:
            return v
        raise EventError(f"doc value for {key(event)!r} is not a number: {_short(v)}")

    return number


def _doc_builder(doc: Mapping[Template, Template]) -> Callable[[Event], dict[str, Any]]:
    """One function building the doc. The commonest doc, ``{"{event_type}": 1}``
    (count events by a field), gets a specialised one: one lookup, one dict."""
    if not doc:
        return lambda event: {}
    if len(doc) == 1:
        ((name, value),) = doc.items()
        if name.key is not None and value.is_constant:
            field_name, number = name.key, value.source

            def count(event: Event) -> dict[str, Any]:
                try:
                    k = event[field_name]
                except KeyError as e:
                    raise _missing(e) from None
                return {k if k.__class__ is str else _text(k): number}

            return count
        key, get = name.text, _doc_value(name.text, value)
        return lambda event: {key(event): get(event)}
    entries = tuple((k.text, _doc_value(k.text, v)) for k, v in doc.items())
    if all(k.is_constant for k in doc):
        # Distinct constant keys cannot collide.
        return lambda event: {key(event): get(event) for key, get in entries}

    def summed(event: Event) -> dict[str, Any]:
        # Two templated keys may render the same name ("{a}" and "total"): the
        # doc is summed, so their values add up rather than one hiding the other.
        out: dict[str, Any] = {}
        for key, get in entries:
            k, v = key(event), get(event)
            out[k] = out[k] + v if k in out else v
        return out

    return summed


class Router:
    """Every route of a config, applied to events in order.

    Args:
        routes: the routes; several may match one event.
    """

    __slots__ = ("routes", "_compiled")

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        self._compiled = tuple((r._match, r._entry) for r in self.routes)

    def route(self, event: Event) -> list[Routed]:
        """``(route, id, spec, doc)`` for every route matching ``event``; ``[]`` if none.

        Args:
            event: one decoded JSON object (a dict; the caller checks).

        Raises:
            EventError: a matching route could not be built (the first one that
                failed); the caller dead-letters the whole event, so that no
                route counts an event another route rejected.
        """
        out: list[Routed] = []
        for match, entry in self._compiled:
            if match is None or match(event):
                out.append(entry(event))
        return out
