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

A route's fields compile to generated code: for a key's first event, one
function making what the event adds to each field (``items_builder``); for a
cached key, the same lines and the merge written into the route's own merger
(``fold_code``, codegen.py), so that an event is one call, one lookup per event
field, no dispatching and no container built but what the slots keep.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Protocol

from ..clock import now_ms
from ..exceptions import EventError
from ..fields.aggregate import merge_code
from ..fields.strategies import _TEXTS, STRATEGIES, Field, Strategy, _json, check_number
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
    adds (``Strategy.item``: the number, ``(time, JSON text)``...), or None when
    a null is skipped. ``fields.aggregate`` merges them into a key's slots with
    one generated function too. This is the path of a key's first event; an
    event for a cached key takes ``fold_code``, both in one.

    The generated function raises ``EventError`` (the event is dead-lettered)
    for a field missing and not ``optional`` (the first one missing), a null
    under ``nulls = "dead-letter"``, or a value of the wrong type; skipped nulls
    are counted only for an event that is not refused.
    """
    env: dict[str, Any] = {}
    lines = ["def items(event):", *_items_code(fields, env, {})]
    if fields:
        lines += ["    if nulls:", "        SKIPPED.n += nulls"]
    lines.append(f"    return ({''.join(f'x{i}, ' for i in range(len(fields)))})")
    code = "\n".join(lines)
    exec(compile(code, "<fields>", "exec"), env)  # noqa: S102
    built: Callable[[Event], tuple[Any, ...]] = env["items"]
    built.__doc__ = code  # what was generated, for whoever debugs it
    return built


def fold_code(
    fields: Sequence[RouteField], env: dict[str, Any], known: Mapping[str, str]
) -> list[str]:
    """The lines (indented once) merging an event's fields into the dict ``doc`` in
    place: ``items_builder``'s work and ``FieldsUpdate.merge_event``'s at once, with
    no tuple of items and no call (codegen.py writes them into the route's
    merger, the run loop's path for a cached key). As there, an event refused
    (``EventError``) merges nothing and counts no null.

    Args:
        env: the globals the lines will run with: what they call is added.
        known: event field -> the local that already holds it (present).
    """
    check, apply = merge_code([f.field for f in fields], env)
    lines = [*_items_code(fields, env, known), *check]
    if fields:
        lines += ["    if nulls:", "        SKIPPED.n += nulls"]
    return lines + apply


def _items_code(
    fields: Sequence[RouteField], env: dict[str, Any], known: Mapping[str, str]
) -> list[str]:
    """Lines (indented once) setting ``x<i>``, each field's item, from ``event``,
    and ``nulls``, how many nulls were skipped.

    Each event field is looked up once however many fields read it (a
    top-level ``"{field}"``, the usual case; ``known`` ones not at all) and
    each value turned into JSON text once. Other templates are rendered by
    their own function, in field order. Consecutive fields testing the same
    values for null share one test (``_Block``), and a value is checked to be
    a number only once where an earlier check of it runs whenever this one
    would (the first check, the one that can fail, names the same field as
    ever).

    Locals: ``event``, ``e<n>``, ``v<i>``, ``k<i>``, ``j<n>``, ``x<i>``, ``nulls``.
    """
    env.update(
        EventError=EventError,
        _missing=_missing,
        now_ms=now_ms,
        J=_json,
        TEXTS=_TEXTS.get,
        CHECK=check_number,
        MIN=INT64_MIN,
        END=INT64_END,
    )
    reads = _Reads(env, known)
    for i, rf in enumerate(fields):
        strategy = rf.field.strategy
        value = reads.local(rf.value, rf.optional, f"V{i}")
        key = reads.local(rf.key, rf.optional, f"K{i}") if rf.key is not None else None
        if key is None and strategy.timed:
            # Without ``by``, arrival order: the worker's clock. Depends on which event
            # came first, which is the point of "first"/"last" without a time field.
            reads.body.append(_Pure(f"    k{i} = now_ms()"))
            key = f"k{i}"
        text = reads.text(value) if strategy.uses_text else ""
        _add_block(reads.body, _field_block(i, rf, value, key, text))
    if fields:
        env["SKIPPED"] = fields[0].skipped  # one per route, shared by its fields
    lines = reads.fetch()
    lines.append("    nulls = 0")
    checked: list[tuple[frozenset[str], str]] = []
    made: list[tuple[frozenset[str], str, str]] = []
    for item in reads.body:
        lines += item.code(checked, made) if isinstance(item, _Block) else [item]
    return lines


class _Reads:
    """What ``_items_code`` reads from the event, each once: the required top-level
    fields (fetched together, first), the others and the JSON texts (in ``body``,
    in field order, among the fields' blocks)."""

    def __init__(self, env: dict[str, Any], known: Mapping[str, str]) -> None:
        self.env = env
        self.known = known
        self.fetched: dict[str, str] = {}
        """Required top-level field -> its local."""
        self.texts: dict[str, str] = {}
        """Value local -> the local of its JSON text."""
        self.body: list[str | _Block] = []

    def local(self, template: Template, optional: bool, label: str) -> str:
        """A local variable (or constant) holding the template's value for the event."""
        if template.is_constant:
            self.env[label] = template.source
            return label
        name = template.key
        if name is not None and name in self.known:
            return self.known[name]
        if name is not None and not optional:
            return self.fetched.setdefault(name, f"e{len(self.fetched)}")
        if name is None:
            self.env[label] = _getter(template, optional)
        get = f"event.get({name!r})" if name else f"{label}(event)"
        line = f"    {label.lower()} = {get}"
        self.body.append(_Pure(line) if optional else line)  # only a required render fails
        return label.lower()

    def text(self, value: str) -> str:
        """The local of the JSON text of the value in local ``value``."""
        if value not in self.texts:
            self.texts[value] = f"j{len(self.texts)}"
            # _json inlined for the usual values: a string's text is remembered, an
            # int's is its repr
            v = value
            text = f"(TEXTS({v}) or J({v})) if {v}.__class__ is str else "
            text += f"repr({v}) if {v}.__class__ is int else J({v})"
            self.body.append(_Pure(f"    {self.texts[value]} = {text}"))
        return self.texts[value]

    def fetch(self) -> list[str]:
        """The lines looking up the required fields (a missing one names itself)."""
        if not self.fetched:
            return []
        return [
            "    try:",
            *(f"        {v} = event[{name!r}]" for name, v in self.fetched.items()),
            "    except KeyError as e:",
            "        raise _missing(e) from None",
        ]


class _Pure(str):
    """A line that cannot raise (a lookup with a default, a JSON text, the clock):
    it may move before the fields preceding it."""


def _add_block(body: list[str | _Block], block: _Block) -> None:
    """``block`` appended to ``body``, or joined with the last block when that one
    tests the same values and only pure lines come between (moved before it)."""
    blocks = [n for n, item in enumerate(body) if isinstance(item, _Block)]
    if blocks:
        last = body[blocks[-1]]
        between = body[blocks[-1] + 1 :]
        assert isinstance(last, _Block)
        if last.tests == block.tests and all(isinstance(line, _Pure) for line in between):
            last.join(block)
            body[blocks[-1] :] = [*between, last]
            return
    body.append(block)


@dataclass
class _Block:
    """Consecutive fields whose null rule tests the same values: one test, then for
    a null each field's rule (skipped, or the event refused), else each field's
    number checks and item.

    Attributes:
        tests: the locals tested for None (none: ``count``, every event counts).
        nulls: per field, ``(i, None)`` to skip its null, ``(i, reason)`` to refuse it.
        puts: per field, its checks ``(local, what)`` and its item: ``(local, expression)``.
    """

    tests: tuple[str, ...]
    nulls: list[tuple[int, str | None]]
    puts: list[tuple[list[tuple[str, str]], tuple[str, str]]]

    def join(self, other: _Block) -> None:
        self.nulls += other.nulls
        self.puts += other.puts

    def code(
        self, checked: list[tuple[frozenset[str], str]], made: list[tuple[frozenset[str], str, str]]
    ) -> list[str]:
        """The block's lines. ``checked``: ``(tests, local)`` of the checks written so
        far; one whose tests are a subset of this block's ran whenever this block's
        else-branch runs, so its local needs no second check (and gets none).
        ``made``: ``(tests, expression, local)`` of the items built so far, likewise."""
        scope = frozenset(self.tests)
        put: list[str] = []
        for checks, (x, item) in self.puts:
            for var, what in checks:
                if any(v == var and t <= scope for t, v in checked):
                    continue
                checked.append((scope, var))
                put += _check(var, what)
            # A tuple already built (by a block that ran whenever this one runs, as
            # for checks) is shared rather than built again.
            same = [v for t, e, v in made if e == item and t <= scope]
            put.append(f"{x} = {same[0] if same else item}")
            if not same and not item.isidentifier():
                made.append((scope, item, x))
        if not self.tests:  # count: every event counts
            return ["    " + line for line in put]
        null: list[str] = []
        for i, reason in self.nulls:
            if reason is not None:  # refused: the fields after it do not matter
                null.append(f"raise EventError({reason!r})")
                break
            null.append(f"x{i} = None")
        skipped = sum(1 for line in null if line.endswith("= None"))
        if skipped:
            null.insert(0, f"nulls += {skipped}")
        return [
            f"    if {' or '.join(f'{v} is None' for v in self.tests)}:",
            *("        " + line for line in null),
            "    else:",
            *("        " + line for line in put),
        ]


def _check(var: str, what: str) -> list[str]:
    """A number a sink can hold: the common int inline, the rest through CHECK."""
    return [
        f"if {var}.__class__ is not int or not MIN <= {var} < END:",
        f"    CHECK({what!r}, {var})",
    ]


def _field_block(i: int, rf: RouteField, value: str, key: str | None, text: str) -> _Block:
    """One field's null rule (SQL's, or a dead letter), type checks and item ``x<i>``."""
    f = rf.field
    strategy, strict = f.strategy, rf.nulls == "dead-letter"
    checks = []
    if strategy.numeric:
        checks.append((value, f.name))
    if key is not None:
        checks.append((key, f"{f.name} {strategy.key_name}"))
    put = (f"x{i}", strategy.item(value, key or "None", text))
    tests = [value] if strict or strategy.skips_nulls else []
    if key is not None and key not in tests:
        tests.append(key)
    return _Block(tuple(tests), [(i, f"{f.name} is null" if strict else None)], [(checks, put)])


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
