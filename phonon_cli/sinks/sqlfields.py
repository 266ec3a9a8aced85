"""How ``sql.Aggregate`` lays out a route's fields in a table and merges a session
into the row it finds.

Each field is one column named after it, plus hidden ``NAME__*`` columns where the
executed value alone could not be combined with a later session:

==============  ====================================  =================================
strategy        ``NAME``                              hidden
==============  ====================================  =================================
sum, min, max   the number                            -
count           the count                             -
mean            sum / count                           ``__sum``, ``__count``
first, last     the value                             ``__at``: its time
set             JSON array, sorted                    -
list            JSON array of values, oldest first    ``__at``: JSON array of times
top             JSON array of ``[score, value]``      -
distinct_count  the estimate                          ``__hll``: the registers, hex
==============  ====================================  =================================

JSON is TEXT in SQLite and JSONB in PostgreSQL. A first/last value is JSONB in
PostgreSQL; in SQLite a string or number is stored as itself, anything else as
JSON in a BLOB (so a string that looks like JSON is never taken for JSON).

Each strategy's columns, and how a row turns back into slots, are its
``Strategy.columns``, ``dump`` and ``load`` (fields/strategies.py).

Writing a batch, in the one transaction ``sqlbase.write`` opens per database:
take the table's advisory lock (PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already
serializes writers), ``INSERT ... ON CONFLICT DO NOTHING`` the missing rows,
read the batch's rows (``FOR UPDATE``), merge each with the session's slots using
``fields.merge_into`` (the very rules of the in-memory and in-Redis merges), and
``UPDATE`` them with one ``executemany`` per set of fields. Every strategy thus
combines across sessions exactly as within one. A session whose every value was
null has no slots: its row is inserted with NULL columns, as SQL's GROUP BY
keeps a group whose values are all null.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.update import Failures, Update
from ..exceptions import ConfigError, SinkError
from ..fields.strategies import Field, fields_of, finite, merge_into, numbers
from . import parse_database
from .sqlbase import (
    MARK,
    Connection,
    admit_rows,
    check_spec,
    columns,
    key_columns,
)

NUMBER_KINDS = ("int", "float", "other")
COMPATIBLE = {
    "int": NUMBER_KINDS,
    "float": NUMBER_KINDS,
    "json": ("json", "text", "other"),
    "any": ("json", "other"),  # not TEXT: SQLite would turn a number into text
    "text": ("text", "other"),
}
"""Column kind wanted -> kinds of an existing column that can hold it."""
SELECT_CHUNK = 200
"""Rows read per SELECT (each adds a condition per key column)."""


def layout(f: Field, slots: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """The columns of a field, ``(name, kind)``: numbers typed by the slot's value."""
    return f.strategy.columns(f, slots)


def backend_kind(database: Any) -> str:
    return parse_database(database).kind


def check_layout(c: type[Connection], spec: Sequence[str], fields: Sequence[Field]) -> None:
    """Every column a valid identifier, and no two alike as the database compares names.

    Raises:
        ConfigError: keyed ``fields.NAME`` (the route's config checks call this).
    """
    seen = {c.fold(k): f"the spec key {k!r}" for k in spec}
    for f in fields:
        for name, _ in layout(f):
            try:
                c.check_name(name, "column")
            except SinkError as e:
                raise ConfigError(str(e), key=f"fields.{f.name}") from e
            folded = c.fold(name)
            if folded in seen:
                raise ConfigError(
                    f"its column {name!r} collides with {seen[folded]}", key=f"fields.{f.name}"
                )
            seen[folded] = f"the column {name!r} of field {f.name!r}"


def _checked(c: type[Connection], spec: tuple[str, ...], fields: tuple[Field, ...]) -> None:
    """``check_layout`` once per layout. ``fields`` comes from ``fields_of``, which hands
    out the same tuple for the same slots: it is known by identity (hashing eleven
    fields for every executed key cost more than the check)."""
    key = (c, spec, id(fields))
    seen = _CHECKED.get(key)
    if seen is not None and seen[0] is fields:
        if seen[1] is not None:
            raise SinkError(seen[1])
        return
    try:
        check_layout(c, spec, fields)
        problem = None
    except ConfigError as e:
        problem = str(e)
    if len(_CHECKED) > 1024:
        _CHECKED.clear()
    _CHECKED[key] = (fields, problem)
    if problem is not None:
        raise SinkError(problem)


_CHECKED: dict[tuple[Any, ...], tuple[tuple[Field, ...], str | None]] = {}


@dataclass
class Row:
    """One executed aggregate, checked, with the columns it writes (folded -> (name, kind))."""

    update: Update
    table: str
    spec: dict[str, tuple[str, Any]]
    fields: tuple[Field, ...]
    wanted: dict[str, tuple[str, str]]


def prepare(c: type[Connection], u: Update) -> Row:
    """Check an aggregate's names and numbers before any SQL is sent.

    The fields are read from the slots themselves (``fields_of``), so a partial
    rebuilt by a survivor, which has no route, writes the same columns.

    Raises:
        SinkError: no collection or spec, a bad or colliding name, a number out of range.
    """
    table = c.check_name(u.collection, "collection")
    spec = check_spec(c, table, u, "Aggregate")
    fields = fields_of(u.doc)
    _checked(c, tuple(k for k, _ in spec.values()), fields)
    numbered = numbers(u.doc)
    for slot, number in numbered:
        if not finite(number):
            raise SinkError(f"{table}: {slot}={number!r} is not a 64-bit integer or finite float")
    kinds = tuple([number.__class__ for _, number in numbered])
    return Row(u, table, spec, fields, _wanted(c, fields, u.doc, kinds))


def _wanted(
    c: type[Connection], fields: tuple[Field, ...], doc: dict[str, Any], kinds: tuple[type, ...]
) -> Wanted:
    """Folded column -> (column, kind) for these fields; a number column's kind
    follows its value (int or float), so the layout is remembered per ``kinds``,
    the types of the slots' numbers (``numbers``: a sum, a mean's sum, a first's
    time...)."""
    shape = (c, id(fields), kinds)
    found = _WANTED.get(shape)
    if found is None or found[0] is not fields:  # known by identity, as in ``_checked``
        found = (fields, {c.fold(n): (n, kind) for f in fields for n, kind in layout(f, doc)})
        if len(_WANTED) > 1024:
            _WANTED.clear()
        _WANTED[shape] = found
    return found[1]


Wanted = dict[str, tuple[str, str]]
_WANTED: dict[tuple[Any, ...], tuple[tuple[Field, ...], Wanted]] = {}


def _suits(column_kind: str, wanted: str) -> bool:
    return column_kind in COMPATIBLE[wanted]


def write_table(c: Connection, table: str, rows: list[Row]) -> Failures:
    """Merge rows into one table inside the caller's transaction; return rejected rows."""
    more = [c.column(name, kind) for name, kind in rows[0].wanted.values()]
    cols = columns(c, table, rows[0].spec, more)
    c.lock_table(table)  # PostgreSQL: one read-merge-write of this table at a time
    ready, failures, cols = admit_rows(c, table, cols, rows, _suits, nullable=True)
    if not ready:
        return failures
    keys = key_columns(cols)
    wanted = list(dict.fromkeys(f for _, row in ready for f in row.wanted))
    # One key may execute twice in a batch (evicted, seen again, evicted again): its
    # sessions are merged first, or the second UPDATE would overwrite the first.
    # Nothing here changes an update's own doc: a failed transaction caches these very
    # updates back in Redis (merge_into copies what it keeps).
    merged: dict[tuple[Any, ...], tuple[dict[str, Any], tuple[Field, ...]]] = {}
    merged_from: dict[tuple[Any, ...], dict[str, Any]] = {}
    for key, row in ready:
        if key not in merged:
            merged_from[key] = row.update.doc  # the usual case: read only, never changed
            merged[key] = (row.update.doc, row.fields)
            continue
        doc, _ = merged[key]
        if doc is merged_from.get(key):
            doc = {}
            merge_into(doc, merged_from[key])
        merge_into(doc, row.update.doc)
        merged[key] = (doc, fields_of(doc))
    # The same key order in every worker (and the table lock in PostgreSQL): no deadlock.
    keys_sorted = sorted(merged, key=repr)
    q = c.quote
    key_names = [q(cols[k].name) for k in keys]
    c.executemany(
        f"INSERT INTO {q(table)} ({', '.join(key_names)}) "
        f"VALUES ({', '.join([MARK] * len(keys))}) "
        f"ON CONFLICT ({', '.join(key_names)}) DO NOTHING",
        keys_sorted,
    )
    stored = _read(c, table, cols, keys, wanted, keys_sorted)
    # Rows with the same fields are one executemany. fields_of hands out one tuple per
    # set of slots, so the group is found by identity (no hashing of the fields).
    groups: dict[int, tuple[tuple[Field, ...], list[tuple[Any, ...]]]] = {}
    for key in keys_sorted:
        doc, fields = merged[key]
        values: list[Any] = []
        held = stored[key]
        fresh = [*held.values()].count(None) == len(held)  # a new row: nothing to load
        for field in fields:
            slots = {} if fresh else field.strategy.load(c, field, held)
            if slots:  # combined with what the row holds (a new slots dict)
                merge_into(slots, {s: doc[s] for s in field.slots() if s in doc})
            else:  # a new row, or this field's first value: the session's slots as they are
                slots = doc
            values += field.strategy.dump(c, field, slots)
        if fields:  # else every value was null: the row inserted above is the result
            groups.setdefault(id(fields), (fields, []))[1].append((*values, *key))
    where = " AND ".join(f"{k} = {MARK}" for k in key_names)
    for group, params in groups.values():
        sets = ", ".join(
            f"{q(cols[c.fold(name)].name)} = {c.json_param if kind in ('json', 'any') else MARK}"
            for f in group
            for name, kind in layout(f)
        )
        c.executemany(f"UPDATE {q(table)} SET {sets} WHERE {where}", params)
    return failures


def _read(
    c: Connection,
    table: str,
    cols: dict[str, Any],
    keys: list[str],
    fields: list[str],
    wanted_keys: list[tuple[Any, ...]],
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Key -> (folded column -> value) for the rows of ``wanted_keys``, locked in PostgreSQL."""
    q = c.quote
    names = [q(cols[k].name) for k in keys] + [q(cols[f].name) for f in fields]
    one = "(" + " AND ".join(f"{q(cols[k].name)} = {MARK}" for k in keys) + ")"
    lock = " FOR UPDATE" if c.db.kind == "postgresql" else ""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for start in range(0, len(wanted_keys), SELECT_CHUNK):
        chunk = wanted_keys[start : start + SELECT_CHUNK]
        sql = f"SELECT {', '.join(names)} FROM {q(table)} WHERE {' OR '.join([one] * len(chunk))}"
        for r in c.query(sql + lock, [v for key in chunk for v in key]):
            out[tuple(r[: len(keys)])] = dict(zip(fields, r[len(keys) :]))
    missing = [k for k in wanted_keys if k not in out]
    if missing:  # inserted just above, in this transaction: cannot happen unless keys differ
        raise SinkError(f"{table}: rows {missing[:3]} not found after insert")
    return out
