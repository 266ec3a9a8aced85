"""A route's ``fields``: checked when the config loads, compiled to what makes an
event's merge slots.

A route with ``fields`` says, per field, how values combine (``fields.py`` has the
strategies). Everything that can be known before the first event is checked
here, so that ``phonon check`` catches it: an unknown strategy, a ``top``
without a score, a cap that is not a positive integer, a value that can never be
a number for a numeric strategy. What only an event can tell (a field missing, a
string where a number was promised) sends that event to the dead-letter file.

Each field compiles to one closure, ``RouteField.start``, so that building an
event's slots is a call per field and no dispatching.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from ..clock import now_ms
from ..fields.strategies import NUMERIC, STRATEGIES, Field

if TYPE_CHECKING:
    from .routes import Event, Template

__all__ = ["FIELD_KEYS", "RouteField", "parse_fields"]

FIELD_KEYS = ("value", "merge", "by", "score", "n")
TIMED = ("first", "last", "list")
"""Strategies ordered by time: ``by`` names the event's time, else arrival time is used."""
BAD_NAME_CHARS = ("\t", "\n", "\r", ":", "\x00")
"""A field name is part of a Redis hash field ``<op>:<name>`` sent as tab- and
newline-separated text, and of SQL column names: none of these may appear."""


@dataclass(frozen=True, slots=True)
class RouteField:
    """One declared field of a route: its strategy and the templates that feed it.

    Attributes:
        field: the name, strategy and cap (``fields.Field``).
        value: the template of the value merged (a constant 1 for a ``count``
            declared without one).
        key: the time (``first``, ``last``, ``list``) or score (``top``) template;
            None for the others, and for timed strategies without ``by``, whose
            key is then the arrival time (the worker's clock, epoch ms).
        start: ``event -> slots``; raises ``EventError`` on a missing field or a
            value of the wrong type (the event is dead-lettered).
    """

    field: Field
    value: Template
    key: Template | None = None
    start: Callable[[Event], dict[str, Any]] = dataclass_field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _starter(self.field, self.value, self.key))


def _starter(f: Field, value: Template, key: Template | None) -> Callable[[Event], Any]:
    start, render = f.start, value.render
    if key is not None:
        render_key = key.render
        return lambda event: start(render(event), render_key(event))
    if f.merge in TIMED:
        # Arrival order: the worker's clock. Depends on which event came first, which
        # is the point of "first"/"last" without a time field, and said so in the docs.
        return lambda event: start(render(event), now_ms())
    return lambda event: start(render(event))


class Checker(Protocol):
    """What ``parse_fields`` needs of the config validator."""

    def fail(self, key: str | None, message: str) -> NoReturn: ...

    def table(self, value: Any, key: str | None, known: tuple[str, ...]) -> Mapping[str, Any]: ...

    def template(self, value: Any, key: str) -> Template: ...


def parse_fields(check: Checker, value: Any, key: str) -> tuple[RouteField, ...]:
    """Validate a route's ``fields`` table and compile each field.

    Args:
        check: the config validator (it knows the file, for messages).
        value: the parsed ``fields`` table: name -> ``{value, merge, by, score, n}``.
        key: where it is (``routes[0].fields``).

    Raises:
        ConfigError: through ``check.fail``, naming ``routes[i].fields.NAME.KEY``.
    """
    if not isinstance(value, Mapping):
        check.fail(key, f"expected a table of fields, got {type(value).__name__}")
    if not value:
        check.fail(key, "at least one field is required")
    return tuple(_field(check, name, spec, f"{key}.{name}") for name, spec in value.items())


def _field(check: Checker, name: Any, spec: Any, key: str) -> RouteField:
    if not isinstance(name, str) or not name.strip():
        check.fail(key, "a field name must be a non-empty string")
    bad = [c for c in BAD_NAME_CHARS if c in name]
    if bad:
        check.fail(key, f"a field name cannot contain {', '.join(repr(c) for c in bad)}")
    table = check.table(spec, key, FIELD_KEYS)
    if "merge" not in table:
        check.fail(f"{key}.merge", f"missing: one of {', '.join(STRATEGIES)}")
    merge = table["merge"]
    if merge not in STRATEGIES:
        check.fail(f"{key}.merge", f"unknown strategy {merge!r} (known: {', '.join(STRATEGIES)})")
    for option, allowed in (("by", TIMED), ("score", ("top",)), ("n", ("list", "top"))):
        if option in table and merge not in allowed:
            check.fail(f"{key}.{option}", f"{option!r} applies to {' and '.join(allowed)} only")
    n = table.get("n", 0)
    if merge == "top" and "n" not in table:
        check.fail(f"{key}.n", "missing: top keeps the n largest, so it needs n (e.g. n = 10)")
    if "n" in table and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        check.fail(f"{key}.n", f"expected a positive integer, got {n!r}")
    if merge == "top" and "score" not in table:
        check.fail(f"{key}.score", "missing: top ranks values by a score, e.g. score = '{amount}'")
    if "value" not in table and merge != "count":
        check.fail(f"{key}.value", "missing: the value to merge, e.g. value = '{amount}'")
    value = _value(check, table.get("value", 1), f"{key}.value", merge in NUMERIC)
    k: Template | None = None
    if "by" in table:
        k = _whole_field(check, table["by"], f"{key}.by", "the event's time (a number)")
    elif "score" in table:
        k = _value(check, table["score"], f"{key}.score", numeric=True)
    return RouteField(Field(name, merge, n), value, k)


def _value(check: Checker, source: Any, key: str, numeric: bool) -> Template:
    """A value template; for a numeric strategy, one that can yield a number."""
    if not isinstance(source, (str, int, float)):  # bool is an int
        check.fail(key, f"expected a template or a constant, got {type(source).__name__}")
    template = check.template(source, key)
    if not numeric:
        return template
    if isinstance(source, bool) or (template.is_constant and not isinstance(source, (int, float))):
        check.fail(key, f"{source!r} is not a number")
    if isinstance(source, str) and not template.is_constant and not template.is_whole_field:
        # Text around a placeholder renders a string, never a number.
        check.fail(key, f"template {source!r} yields text, not a number (use '{{field}}')")
    return template


def _whole_field(check: Checker, source: Any, key: str, what: str) -> Template:
    template = check.template(source, key) if isinstance(source, str) else None
    if template is None or not template.is_whole_field:
        check.fail(key, f"expected '{{field}}' naming {what}, got {source!r}")
    return template
