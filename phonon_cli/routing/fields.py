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

A route's fields compile to one generated function (``items_builder``), so that
what an event adds to each field is one call, one lookup per event field and no
dispatching.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Protocol

from ..clock import now_ms
from ..exceptions import EventError
from ..fields import hll
from ..fields.strategies import STRATEGIES, Field, Strategy, _json, check_number
from ..poison import INT64_END, INT64_MIN
from .templates import _missing

if TYPE_CHECKING:
    from .routes import Event, Template

__all__ = ["FIELD_KEYS", "NULL_RULES", "RouteField", "Skipped", "items_builder", "parse_fields"]

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
    """

    field: Field
    value: Template
    key: Template | None = None
    nulls: NullRule = "sql"
    optional: bool = False
    skipped: Skipped = dataclass_field(default_factory=Skipped, compare=False, hash=False)


def items_builder(fields: Sequence[RouteField]) -> Callable[[Event], tuple[Any, ...]]:
    """One generated function making what an event adds to each field: its *items*.

    The items are a tuple, one per field in order: what the field's strategy
    adds (``Strategy.item``: the number, ``(time, JSON text)``, the register
    and rank...), or None when a null is skipped. ``fields.aggregate`` merges
    them into a key's slots with one generated function too, so an event is
    two calls whatever the number of fields.

    Each event field is looked up once however many fields read it (a
    top-level ``"{field}"``, the usual case) and each value turned into JSON
    text once. Other templates are rendered by their own function, in field
    order. The generated function raises ``EventError`` (the event is
    dead-lettered) for a field missing and not ``optional`` (the first one
    missing), a null under ``nulls = "dead-letter"``, or a value of the wrong
    type; skipped nulls are counted only for an event that is not refused.
    """
    env: dict[str, Any] = {
        "EventError": EventError,
        "_missing": _missing,
        "now_ms": now_ms,
        "J": _json,
        "REGISTER": hll.register,
        "CHECK": check_number,
        "MIN": INT64_MIN,
        "END": INT64_END,
    }
    fetched: dict[str, str] = {}  # required top-level field -> local variable
    body: list[str] = []
    texts: dict[str, str] = {}  # value local -> local of its JSON text

    def local(template: Template, optional: bool, label: str) -> str:
        """A local variable (or constant) holding the template's value for the event."""
        if template.is_constant:
            env[label] = template.source
            return label
        name = template.key
        if name is not None and not optional:
            if name not in fetched:
                fetched[name] = f"e{len(fetched)}"
            return fetched[name]
        if name is None:
            env[label] = _getter(template, optional)
        body.append(
            f"    {label.lower()} = " + (f"event.get({name!r})" if name else f"{label}(event)")
        )
        return label.lower()

    for i, rf in enumerate(fields):
        strategy = rf.field.strategy
        value = local(rf.value, rf.optional, f"V{i}")
        key = local(rf.key, rf.optional, f"K{i}") if rf.key is not None else None
        if key is None and strategy.timed:
            # Without ``by``, arrival order: the worker's clock. Depends on which event
            # came first, which is the point of "first"/"last" without a time field.
            body.append(f"    k{i} = now_ms()")
            key = f"k{i}"
        text = ""
        if strategy.uses_text:
            if value not in texts:
                texts[value] = f"j{len(texts)}"
                body.append(f"    {texts[value]} = J({value})")
            text = texts[value]
        body += _field_code(i, rf, value, key, text)
    lines = ["def items(event):"]
    if fetched:
        lines.append("    try:")
        lines += [f"        {v} = event[{name!r}]" for name, v in fetched.items()]
        lines.append("    except KeyError as e:")
        lines.append("        raise _missing(e) from None")
    if fields:
        env["SKIPPED"] = fields[0].skipped  # one per route, shared by its fields
    lines += ["    skipped = 0", *body]
    lines += ["    if skipped:", "        SKIPPED.n += skipped"]
    lines.append(f"    return ({''.join(f'x{i}, ' for i in range(len(fields)))})")
    code = "\n".join(lines)
    exec(compile(code, "<fields>", "exec"), env)  # noqa: S102
    built: Callable[[Event], tuple[Any, ...]] = env["items"]
    built.__doc__ = code  # what was generated, for whoever debugs it
    return built


def _check(var: str, what: str) -> list[str]:
    """A number a sink can hold: the common int inline, the rest through CHECK."""
    return [
        f"if {var}.__class__ is not int or not MIN <= {var} < END:",
        f"    CHECK({what!r}, {var})",
    ]


def _field_code(i: int, rf: RouteField, value: str, key: str | None, text: str) -> list[str]:
    """One field's lines: its null rule (SQL's, or a dead letter), its type checks,
    then its item ``x<i>``."""
    f = rf.field
    strategy, strict = f.strategy, rf.nulls == "dead-letter"
    put = [f"x{i} = {strategy.item(value, key or 'None', text)}"]
    if key is not None:
        put = _check(key, f"{f.name} {strategy.key_name}") + put
    if strategy.numeric:
        put = _check(value, f.name) + put
    nulls = [value] if strict or strategy.skips_nulls else []
    if key is not None:
        nulls.append(key)
    if not nulls:  # count: every event counts
        return ["    " + line for line in put]
    if strict:
        refuse = [f"raise EventError({f.name!r} + ' is null')"]
    else:
        refuse = ["skipped += 1", f"x{i} = None"]
    test = " or ".join(f"{v} is None" for v in nulls)
    return [
        f"    if {test}:",
        *("        " + line for line in refuse),
        "    else:",
        *("        " + line for line in put),
    ]


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
