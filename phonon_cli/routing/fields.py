"""A route's ``fields``: checked when the config loads, compiled to what makes an
event's merge slots.

A route with ``fields`` says, per field, how values combine (the strategies are
in ``fields/strategies.py``; what each accepts is read from its class).
Everything that can be known before the first event is checked here, so that
``phonon check`` catches it: an unknown strategy, a ``top`` without a score, a
cap that is not a positive integer, a value that can never be a number for a
numeric strategy. What only an event can tell (a field missing, a string where
a number was promised) sends that event to the dead-letter file.

Nulls follow SQL: a strategy that ``skips_nulls`` ignores a null value (or a
null time or score) and the route counts it; ``first``, ``last`` and ``list``
keep null as a value and ``count`` counts the event. ``nulls = "dead-letter"``
makes a null a dead letter instead; ``optional = true`` makes a missing field a
null instead of a dead letter.

Each field compiles to one closure, ``RouteField.start``, so that building an
event's slots is a call per field and no dispatching.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Protocol

from ..clock import now_ms
from ..exceptions import EventError
from ..fields.strategies import STRATEGIES, Field, Slots, Strategy

if TYPE_CHECKING:
    from .routes import Event, Template

__all__ = ["FIELD_KEYS", "NULL_RULES", "RouteField", "Skipped", "parse_fields"]

FIELD_KEYS = ("value", "merge", "by", "score", "n", "nulls", "optional")
NULL_RULES = ("sql", "dead-letter")
"""``nulls``: SQL's rule (the default), or a null is a dead letter."""
NullRule = Literal["sql", "dead-letter"]
BAD_NAME_CHARS = ("\t", "\n", "\r", ":", "\x00")
"""A field name is part of a Redis hash field ``<op>:<name>`` sent as tab- and
newline-separated text, and of SQL column names: none of these may appear."""
REQUIRED = {
    "n": "{s} keeps the n largest, so it needs n (e.g. n = 10)",
    "score": "{s} ranks values by a score, e.g. score = '{{amount}}'",
}


class Skipped:
    """The nulls a route's fields skipped (one counter per route, shared by its
    fields): the run publishes it for ``phonon status`` and the summary."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


Start = Callable[["Event", Slots], None]


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
        nulls: "sql" or "dead-letter".
        optional: a missing field is a null rather than a dead letter.
        skipped: the route's count of skipped nulls.
        start: ``(event, slots)``: writes the event's slots for this field; raises
            ``EventError`` on a missing field or a value of the wrong type (the
            event is dead-lettered).
    """

    field: Field
    value: Template
    key: Template | None = None
    nulls: NullRule = "sql"
    optional: bool = False
    skipped: Skipped = dataclass_field(default_factory=Skipped, compare=False, hash=False)
    start: Start = dataclass_field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _starter(self))


def _getter(template: Template, optional: bool) -> Callable[[Event], Any]:
    render = template.render
    if not optional:
        return render

    def render_or_null(event: Event) -> Any:
        try:
            return render(event)
        except EventError:  # a template only fails on a missing field
            return None

    return render_or_null


def _starter(rf: RouteField) -> Start:
    f = rf.field
    strategy = f.strategy
    put = strategy.putter(f)
    render = _getter(rf.value, rf.optional)
    strict = rf.nulls == "dead-letter"
    skips = strategy.skips_nulls
    skipped = rf.skipped
    name = f.name
    if rf.key is None and not strategy.timed:
        if not strict and not skips:  # count: every event counts
            return lambda event, out: put(render(event), None, out)

        def start(event: Event, out: Slots) -> None:
            v = render(event)
            if v is None:
                if strict:
                    raise EventError(f"{name} is null")
                if skips:
                    skipped.n += 1
                    return
            put(v, None, out)

        return start
    # Without ``by``, arrival order: the worker's clock. Depends on which event came
    # first, which is the point of "first"/"last" without a time field; the docs say so.
    render_key = _getter(rf.key, rf.optional) if rf.key is not None else _arrival

    def start_keyed(event: Event, out: Slots) -> None:
        v = render(event)
        k = render_key(event)
        if k is None or (v is None and skips):
            if strict:
                raise EventError(f"{name} {'value' if v is None else 'time or score'} is null")
            skipped.n += 1
            return
        if v is None and strict:
            raise EventError(f"{name} is null")
        put(v, k, out)

    return start_keyed


def _arrival(event: Event) -> int:
    return now_ms()


class Checker(Protocol):
    """What ``parse_fields`` needs of the config validator."""

    def fail(self, key: str | None, message: str) -> NoReturn: ...

    def table(self, value: Any, key: str | None, known: tuple[str, ...]) -> Mapping[str, Any]: ...

    def template(self, value: Any, key: str) -> Template: ...


def parse_fields(check: Checker, value: Any, key: str) -> tuple[RouteField, ...]:
    """Validate a route's ``fields`` table and compile each field.

    Args:
        check: the config validator (it knows the file, for messages).
        value: the parsed ``fields`` table: name -> ``{value, merge, by, score, n,
            nulls, optional}``.
        key: where it is (``routes[0].fields``).

    Raises:
        ConfigError: through ``check.fail``, naming ``routes[i].fields.NAME.KEY``.
    """
    if not isinstance(value, Mapping):
        check.fail(key, f"expected a table of fields, got {type(value).__name__}")
    if not value:
        check.fail(key, "at least one field is required")
    skipped = Skipped()  # one per route
    return tuple(
        _field(check, name, spec, f"{key}.{name}", skipped) for name, spec in value.items()
    )


def _field(check: Checker, name: Any, spec: Any, key: str, skipped: Skipped) -> RouteField:
    if not isinstance(name, str) or not name.strip():
        check.fail(key, "a field name must be a non-empty string")
    bad = [c for c in BAD_NAME_CHARS if c in name]
    if bad:
        check.fail(key, f"a field name cannot contain {', '.join(repr(c) for c in bad)}")
    table = check.table(spec, key, FIELD_KEYS)
    strategy = _strategy(check, table, key)
    n = table.get("n", 0)
    nulls, optional = _null_rule(check, table, key)
    value = _value(check, table.get("value", 1), f"{key}.value", strategy.numeric)
    k: Template | None = None
    if "by" in table:
        k = _whole_field(check, table["by"], f"{key}.by", "the event's time (a number)")
    elif "score" in table:
        k = _value(check, table["score"], f"{key}.score", numeric=True)
    return RouteField(Field(name, strategy.name, n), value, k, nulls, optional, skipped)


def _strategy(check: Checker, table: Mapping[str, Any], key: str) -> Strategy:
    """The field's strategy, with the options it takes and requires checked."""
    known = ", ".join(STRATEGIES)
    if "merge" not in table:
        check.fail(f"{key}.merge", f"missing: one of {known}")
    merge = table["merge"]
    strategy = STRATEGIES.get(merge) if isinstance(merge, str) else None
    if strategy is None:
        check.fail(f"{key}.merge", f"unknown strategy {merge!r} (known: {known})")
    for option in ("by", "score", "n"):
        if option in table and option not in strategy.options:
            allowed = [s.name for s in STRATEGIES.values() if option in s.options]
            check.fail(f"{key}.{option}", f"{option!r} applies to {' and '.join(allowed)} only")
    for option in strategy.required:
        if option not in table:
            check.fail(f"{key}.{option}", "missing: " + REQUIRED[option].format(s=merge))
    n = table.get("n", 0)
    if "n" in table and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        check.fail(f"{key}.n", f"expected a positive integer, got {n!r}")
    if "value" not in table and strategy.needs_value:
        check.fail(f"{key}.value", "missing: the value to merge, e.g. value = '{amount}'")
    return strategy


def _null_rule(check: Checker, table: Mapping[str, Any], key: str) -> tuple[NullRule, bool]:
    nulls = table.get("nulls", "sql")
    if nulls not in NULL_RULES:
        check.fail(f"{key}.nulls", f"expected one of {', '.join(NULL_RULES)}, got {nulls!r}")
    optional = table.get("optional", False)
    if not isinstance(optional, bool):
        check.fail(f"{key}.optional", f"expected true or false, got {optional!r}")
    if optional and nulls == "dead-letter":
        check.fail(
            f"{key}.optional",
            "an optional field's missing value is a null, which nulls = 'dead-letter' refuses",
        )
    return nulls, optional


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


def skipped_nulls(fields: tuple[RouteField, ...]) -> int:
    """How many nulls a route's fields skipped so far in this process."""
    return fields[0].skipped.n if fields else 0
