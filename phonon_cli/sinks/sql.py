"""The SQL sinks, for SQLite and PostgreSQL, a batch per transaction.

- ``Counter``: sums per key. Table = ``collection``; the spec keys are its
  primary key; each doc key is a numeric column added on first sight (``NOT
  NULL DEFAULT 0``). An executed key is one ``INSERT ... ON CONFLICT (spec) DO
  UPDATE SET c = cur.c + excluded.c``, so a row only grows by what was
  aggregated, whichever worker writes it.
- ``Aggregate``: per-field strategies (a route's ``fields``), each merged with
  what the row already holds (``sqlfields``; docs/aggregation.md).

Connections, quoting, the schema cache and transactions are in ``sqlbase``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.update import ConflictFreeUpdate, Failures, Update
from ..exceptions import ConfigError, SinkError
from ..fields.aggregate import FieldsUpdate
from . import Database, parse_database, sqlfields
from .sqlbase import (
    BACKENDS,
    INT64,
    MARK,
    Connection,
    admit_rows,
    check_spec,
    checked_table,
    columns,
    execute_by_database,
    key_columns,
    probe,
    value_kind,
    write,
)

if TYPE_CHECKING:
    from ..core.process import Process
    from ..routing.routes import Route

__all__ = ["Aggregate", "Counter"]


@dataclass
class Row:
    """One executed Counter update, checked, names folded as the database compares them."""

    update: Update
    table: str
    spec: dict[str, tuple[str, Any]]  # folded name -> (name, value)
    doc: dict[str, tuple[str, int | float]]
    wanted: dict[str, tuple[str, str]]  # folded name -> (name, int|float)


def prepare(c: type[Connection], u: Update) -> Row:
    """Check an update's names and values before any SQL is sent.

    Raises:
        SinkError: no collection, no spec, a bad identifier, a null key, a non-number.
    """
    table = c.check_name(u.collection, "collection")
    spec = check_spec(c, table, u, "Counter")
    doc: dict[str, tuple[str, int | float]] = {}
    for k, v in u.doc.items():
        f = c.fold(c.check_name(k, f"{table}: doc key"))
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or f in spec
            or (isinstance(v, int) and not -INT64 <= v < INT64)
            or (isinstance(v, float) and not math.isfinite(v))
        ):
            raise SinkError(
                f"{table}: doc {k!r}={v!r}: a spec key, or not a 64-bit integer or finite float"
            )
        # SQLite: "Clicks" and "clicks" are one column, so they add up, as it would.
        doc[f] = (doc[f][0], doc[f][1] + v) if f in doc else (k, v)
    if len(spec) + len(doc) > c.max_columns:
        raise SinkError(
            f"{table}: too many columns ({len(spec) + len(doc):,}; a table holds {c.max_columns:,})"
        )
    wanted = {f: (k, value_kind(v)) for f, (k, v) in doc.items()}
    return Row(u, table, spec, doc, wanted)


def _numeric(column_kind: str, wanted: str) -> bool:
    return column_kind in ("int", "float")


def write_table(c: Connection, table: str, rows: list[Row]) -> Failures:
    """Upsert rows into one table inside the caller's transaction; return rejected rows."""
    ready, failures, cols = admit_rows(c, table, columns(c, table, rows[0].spec), rows, _numeric)
    if not ready:
        return failures
    keys = key_columns(cols)
    wanted = list(dict.fromkeys(f for _, row in ready for f in row.doc))
    q = c.quote
    sums = [q(cols[f].name) for f in wanted]
    names = [q(cols[k].name) for k in keys] + sums
    sets = ", ".join(f"{n} = cur.{n} + excluded.{n}" for n in sums)
    sql = (
        f"INSERT INTO {q(table)} AS cur ({', '.join(names)}) "
        f"VALUES ({', '.join([MARK] * len(names))}) "
        f"ON CONFLICT ({', '.join(names[: len(keys)])}) "
        + (f"DO UPDATE SET {sets}" if sums else "DO NOTHING")
    )
    # The same key order in every worker, so concurrent batches take row locks in
    # one order and cannot deadlock each other.
    ready.sort(key=lambda kr: repr(kr[0]))
    c.executemany(
        sql, [key + tuple(row.doc.get(f, ("", 0))[1] for f in wanted) for key, row in ready]
    )
    return failures


def _write_counters(db: Database, updates: list[Update]) -> Failures:
    return write(db, updates, prepare, write_table)


def _write_aggregates(db: Database, updates: list[Update]) -> Failures:
    return write(db, updates, sqlfields.prepare, sqlfields.write_table)


class Table:
    """What both SQL sinks share: they check their table when built (better at the
    first event than at the first write, half an hour later), and ``execute`` is a
    batch of one."""

    def __init__(
        self,
        process: Process,
        _id: Any,
        database: Any = None,
        collection: str | None = None,
        spec: dict[str, Any] | None = None,
        doc: dict[str, Any] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        table = checked_table(database, collection)
        if not spec:
            raise SinkError(
                f"{table}: the {type(self).__name__} sink needs a non-empty spec (the primary key)"
            )
        super().__init__(process, _id, database, collection, spec, doc, *args, **kwargs)  # type: ignore[call-arg]

    def execute(self) -> None:
        failures = type(self).execute_many([self])  # type: ignore[attr-defined]
        if failures:
            raise failures[0][1]

    @classmethod
    def check_connect(cls, route: Route) -> str | None:
        return probe(route.database)

    @classmethod
    def check_route(cls, route: Route) -> None:
        """Checked when the config loads (``phonon check``): the table can be written.

        Raises:
            ConfigError: keyed relative to the route (``database``, ``collection``, ``spec``).
        """
        for key, value in (("database", route.database), ("collection", route.collection)):
            if value is None:
                raise ConfigError(f"missing: {cls.__name__} writes to a SQL table", key=key)
        try:
            parse_database(route.database)
        except SinkError as e:
            raise ConfigError(str(e), key="database") from e
        try:
            checked_table(route.database, route.collection)
        except SinkError as e:
            raise ConfigError(str(e), key="collection") from e
        if not route.spec:
            raise ConfigError("missing: the table's primary key, e.g. { id = '{id}' }", key="spec")


class Counter(Table, ConflictFreeUpdate):
    """Sums per key in a SQL table: ``database`` is ``sqlite:///PATH`` or ``postgresql://...``,
    ``collection`` the table, ``spec`` its primary key, ``doc`` the numbers to add.

    Raises:
        SinkError: at construction, when the database URL, collection or spec is unusable
            (better at the first event than at the first write, half an hour later).
    """

    @classmethod
    def execute_many(cls, updates: Sequence[Update]) -> Failures:
        """One transaction per database; a failed transaction fails all its updates."""
        return execute_by_database(updates, _write_counters)


class Aggregate(Table, FieldsUpdate):
    """Per-field strategies per key in a SQL table, merged with the row it finds.

    ``collection`` is the table, ``spec`` its primary key, and each of the route's
    ``fields`` one column or a few (hidden ``NAME__*`` columns keep what a later
    session needs to combine correctly: a mean's sum and count, a HyperLogLog's
    registers, a first/last's time). See docs/aggregation.md for the layout.

    Raises:
        SinkError: at construction, when the database URL, collection or spec is unusable.
    """

    @classmethod
    def check_route(cls, route: Route) -> None:
        """Checked when the config loads (``phonon check``): the table can be written.

        Raises:
            ConfigError: keyed relative to the route (``database``, ``spec``, ``fields.X``).
        """
        super().check_route(route)
        backend = BACKENDS[sqlfields.backend_kind(route.database)]
        sqlfields.check_layout(backend, list(route.spec), [f.field for f in route.fields])

    @classmethod
    def execute_many(cls, updates: Sequence[Update]) -> Failures:
        """One transaction per database; a failed transaction fails all its updates."""
        return execute_by_database(updates, _write_aggregates)
