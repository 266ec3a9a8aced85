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

Writing a batch, in the one transaction ``sqlbase.write`` opens per database:
take the table's advisory lock (PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already
serializes writers), ``INSERT ... ON CONFLICT DO NOTHING`` the missing rows,
read the batch's rows (``FOR UPDATE``), merge each with the session's slots using
``fields.merge_slot`` (the very rules of the in-memory and in-Redis merges), and
``UPDATE`` them with one ``executemany`` per set of fields. Every strategy thus
combines across sessions exactly as within one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ..core.update import Failures, Update
from ..exceptions import ConfigError, SinkError
from ..fields.strategies import Field, fields_of, hll_estimate, merge_slot
from . import parse_database
from .sqlbase import (
    INT64,
    MARK,
    Connection,
    check_spec,
    columns,
    ensure_columns,
    key_columns,
    row_key,
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


def canonical(value: Any) -> str:
    """A value as the merge slots spell it (``fields._json``): sorted keys, so equal
    values read back from JSONB (which reorders keys) compare equal."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _num(value: Any) -> str:
    return "float" if isinstance(value, float) else "int"


def layout(f: Field, slots: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """The columns of a field, ``(name, kind)``: numbers typed by the slot's value."""
    s, m, n = f.slots(), f.merge, f.name
    v = (slots or {}).get(s[0])
    if m in ("sum", "min", "max"):
        return [(n, _num(v))]
    if m == "count":
        return [(n, "int")]
    if m == "mean":
        return [(n, "float"), (f"{n}__sum", _num(v)), (f"{n}__count", "int")]
    if m in ("first", "last"):
        return [(n, "any"), (f"{n}__at", _num(v[0] if v else 0))]
    if m == "list":
        return [(n, "json"), (f"{n}__at", "json")]
    if m == "distinct_count":
        return [(n, "int"), (f"{n}__hll", "text")]
    return [(n, "json")]  # set, top


def dump(c: Connection, f: Field, slots: dict[str, Any]) -> list[Any]:
    """The field's column values (``layout`` order) from its slots."""
    s, m = f.slots(), f.merge
    v = slots[s[0]]
    if m == "mean":
        return [v / slots[s[1]], v, slots[s[1]]]
    if m in ("first", "last"):
        return [c.dump_any(orjson.loads(v[1])), v[0]]
    if m == "list":
        items = merge_slot(s[0], [], v)  # ordered by time, capped, as the result is
        return [_json([orjson.loads(t) for _, t in items]), _json([k for k, _ in items])]
    if m in ("set", "top"):
        return [_json(f.result(slots))]
    if m == "distinct_count":
        return [hll_estimate(v), bytes(v).hex()]
    return [v]


def load(c: Connection, f: Field, row: dict[str, Any]) -> dict[str, Any]:
    """The slots a row holds for a field (``row``: folded column -> value); {} if unset."""
    s, m, n = f.slots(), f.merge, f.name

    def stored(name: str) -> Any:
        return row.get(c.fold(name))

    if m == "mean":
        count = stored(f"{n}__count")
        return {} if count is None else {s[0]: stored(f"{n}__sum"), s[1]: count}
    if m in ("first", "last"):
        at = stored(f"{n}__at")
        return {} if at is None else {s[0]: (at, canonical(c.load_any(stored(n))))}
    if m == "distinct_count":
        registers = stored(f"{n}__hll")
        return {} if registers is None else {s[0]: bytearray.fromhex(registers)}
    v = stored(n)
    if v is None:
        return {}
    if m == "set":
        return {s[0]: {canonical(x) for x in c.load_json(v)}}
    if m == "list":
        times = c.load_json(stored(f"{n}__at")) or []
        return {s[0]: [(k, canonical(x)) for k, x in zip(times, c.load_json(v))]}
    if m == "top":
        return {s[0]: [(k, canonical(x)) for k, x in c.load_json(v)]}
    return {s[0]: v}


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


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


@functools.lru_cache(maxsize=256)
def _checked(c: type[Connection], spec: tuple[str, ...], fields: tuple[Field, ...]) -> None:
    try:
        check_layout(c, spec, fields)
    except ConfigError as e:
        raise SinkError(str(e)) from e


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
    _checked(c, tuple(k for k, _ in spec.values()), fields)  # type: ignore[arg-type]
    for slot, v in u.doc.items():
        op = slot.partition(":")[0]
        number = v[0] if op in ("first", "last") else v
        if op in ("sum", "cnt", "min", "max", "msum", "mcnt", "first", "last") and (
            (isinstance(number, int) and not -INT64 <= number < INT64)
            or (isinstance(number, float) and not math.isfinite(number))
        ):
            raise SinkError(f"{table}: {slot}={number!r} is not a 64-bit integer or finite float")
    wanted = {c.fold(name): (name, kind) for f in fields for name, kind in layout(f, u.doc)}
    return Row(u, table, spec, fields, wanted)


def write_table(c: Connection, table: str, rows: list[Row]) -> Failures:
    """Merge rows into one table inside the caller's transaction; return rejected rows."""
    more = [c.column(name, kind) for name, kind in rows[0].wanted.values()]
    cols = columns(c, table, rows[0].spec, more)
    c.lock_table(table)  # PostgreSQL: one read-merge-write of this table at a time
    keys = key_columns(cols)
    failures: Failures = []
    ready: list[tuple[tuple[Any, ...], Row]] = []
    wanted: dict[str, tuple[str, str]] = {}
    for row in rows:
        try:
            key = row_key(cols, row)
            bad = [
                name
                for f, (name, kind) in row.wanted.items()
                if f in cols and (cols[f].pk or cols[f].kind not in COMPATIBLE[kind])
            ]
            if bad:
                raise SinkError(f"{table}: columns {bad} have the wrong type for their strategy")
        except SinkError as e:
            failures.append((row.update, e))
            continue
        ready.append((key, row))
        for f, (name, kind) in row.wanted.items():
            if f not in wanted or kind == "float":
                wanted[f] = (name, kind)
    cols = ensure_columns(c, table, cols, wanted, nullable=True)
    if failures:  # perhaps the schema was fixed by hand meanwhile: re-read it next time
        c.tables.pop(table, None)
    if not ready:
        return failures
    # One key may execute twice in a batch (evicted, seen again, evicted again): its
    # sessions are merged first, or the second UPDATE would overwrite the first.
    merged: dict[tuple[Any, ...], tuple[dict[str, Any], dict[str, Field]]] = {}
    for key, row in ready:
        doc, named = merged.setdefault(key, ({}, {}))
        for slot, value in row.update.doc.items():
            doc[slot] = merge_slot(slot, doc[slot], value) if slot in doc else value
        named.update((f.name, f) for f in row.fields)
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
    stored = _read(c, table, cols, keys, list(wanted), keys_sorted)
    groups: dict[tuple[Field, ...], list[tuple[Any, ...]]] = {}
    for key in keys_sorted:
        doc, named = merged[key]
        values: list[Any] = []
        for field in named.values():
            slots = load(c, field, stored[key])
            for slot in field.slots():
                if slot in doc:
                    new = doc[slot]
                    slots[slot] = merge_slot(slot, slots[slot], new) if slot in slots else new
            values += dump(c, field, slots)
        groups.setdefault(tuple(named.values()), []).append((*values, *key))
    where = " AND ".join(f"{k} = {MARK}" for k in key_names)
    for group, params in groups.items():
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
