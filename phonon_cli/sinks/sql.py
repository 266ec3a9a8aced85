"""``Counter``: sums per key, upserted into SQLite or PostgreSQL, a batch per transaction.

Table = ``collection``; the spec keys are its primary key; each doc key is a
numeric column added on first sight (``NOT NULL DEFAULT 0``). An executed key
is one ``INSERT ... ON CONFLICT (spec) DO UPDATE SET c = cur.c + excluded.c``,
so a row only grows by what was aggregated, whichever worker writes it.

Doc keys come from event data (``{event_type}``), so every identifier is quoted
(double quotes, inner quotes doubled) and NUL is refused: data can name a
column, never write SQL. The schema is read once per connection and cached, so
a batch costs one ``executemany`` per table. After a failed transaction the
connection and its cache are dropped: a rolled-back ``ALTER TABLE`` would
otherwise leave the cache believing in a column that does not exist.
"""

from __future__ import annotations

import functools
import math
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from ..exceptions import SinkError
from ..update import ConflictFreeUpdate, Failures, Update
from . import Database, discard, parse_database, thread_handle

if TYPE_CHECKING:
    from ..process import Process

INT64 = 2**63
MARK = "\x00"
"""Placeholder in built SQL, swapped for the driver's: NUL is never in a name (``check_name``)."""
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@dataclass
class Column:
    name: str
    kind: str  # int | float | text | bool | other
    pk: bool = False


FITS = {("int", "int"), ("int", "bool"), ("float", "float"), ("float", "int"), ("bool", "bool")}
"""(column kind, value kind) pairs a key column takes as they are."""


def _kind(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float"}.get(type(value), "text")


class Connection:
    """One thread's connection to one database, and what it knows of the schema.
    Subclasses hold what differs between SQLite and PostgreSQL."""

    types: ClassVar[dict[str, str]]

    def __init__(self, db: Database) -> None:
        self.db = db
        self.conn: Any = None
        self.tables: dict[str, dict[str, Column]] = {}
        """Table -> folded column name -> column."""

    @staticmethod
    def fold(name: str) -> str:
        """The name as the database compares it."""
        return name

    @staticmethod
    def quote(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    @classmethod
    def check_name(cls, name: object, what: str) -> str:
        if not isinstance(name, str) or not name or "\x00" in name:
            raise SinkError(f"{what} {name!r} is not a valid SQL identifier (empty or NUL)")
        return name

    def close(self) -> None:
        self.conn.close()

    def transaction(self) -> Any:
        raise NotImplementedError

    def read(self, table: str) -> dict[str, Column] | None:
        raise NotImplementedError

    def lock_table(self, table: str) -> None:
        """Serialize creating ``table`` with other workers (SQLite: BEGIN IMMEDIATE did)."""

    def add_columns(self, table: str, cols: list[tuple[str, str]]) -> None:
        for name, kind in cols:
            self.conn.execute(
                f"ALTER TABLE {self.quote(table)} ADD COLUMN {self.quote(name)} "
                f"{self.types[kind]} NOT NULL DEFAULT 0"
            )

    def widen(self, table: str, name: str) -> bool:
        """Make an integer doc column hold floats; True if the schema changed."""
        return False  # SQLite's INTEGER affinity keeps a non-integral value as REAL

    def executemany(self, sql: str, params: list[tuple[Any, ...]]) -> None:
        self.conn.executemany(sql.replace(MARK, "?"), params)


class SQLite(Connection):
    types: ClassVar[dict[str, str]] = {
        "int": "INTEGER",
        "float": "REAL",
        "text": "TEXT",
        "bool": "INTEGER",
    }

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        if sqlite3.sqlite_version_info < (3, 24, 0):
            raise SinkError(
                f"{db.display}: SQLite {sqlite3.sqlite_version} has no UPSERT; "
                "3.24 or later is needed"
            )
        assert db.path is not None
        if os.path.dirname(db.path):
            os.makedirs(os.path.dirname(db.path), exist_ok=True)
        # Autocommit mode, and transactions are BEGIN IMMEDIATE: the write lock is
        # taken up front, so the busy timeout applies (a deferred BEGIN that upgrades
        # later fails at once with SQLITE_BUSY). WAL lets several worker processes
        # share the file. check_same_thread=False only so close_all() may close it.
        timeout_s = Counter.sqlite_busy_timeout_s
        self.conn = sqlite3.connect(
            db.path, timeout=timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            self._wal(time.monotonic() + timeout_s)
        except sqlite3.Error:
            self.conn.close()
            raise

    def _wal(self, deadline: float) -> None:
        # Switching a new file to WAL while other workers open it fails at once with
        # "database is locked": SQLite does not call the busy handler there. So wait here.
        pause_s = 0.005
        while True:
            try:
                if self.conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self.conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(pause_s)
                pause_s = min(pause_s * 2, 0.1)

    @staticmethod
    def fold(name: str) -> str:
        return name.translate(_ASCII_LOWER)  # SQLite ignores ASCII case, and only that

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def read(self, table: str) -> dict[str, Column] | None:
        cols = {}
        for _, name, decl, _, _, pk in self.conn.execute(f"PRAGMA table_info({self.quote(table)})"):
            decl = decl.upper()
            kind = (
                "int"
                if "INT" in decl
                else "text"
                if any(t in decl for t in ("CHAR", "CLOB", "TEXT"))
                else "float"
                if any(t in decl for t in ("REAL", "FLOA", "DOUB"))
                else "other"
            )
            cols[self.fold(name)] = Column(name, kind, pk > 0)
        return cols or None


class PostgreSQL(Connection):
    types: ClassVar[dict[str, str]] = {
        "int": "BIGINT",
        "float": "DOUBLE PRECISION",
        "text": "TEXT",
        "bool": "BOOLEAN",
    }
    kinds: ClassVar[dict[str, str]] = {
        "bigint": "int",
        "integer": "int",
        "smallint": "int",
        "double precision": "float",
        "real": "float",
        "numeric": "float",
        "text": "text",
        "boolean": "bool",
    }

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        try:
            import psycopg
        except ImportError as e:
            raise SinkError(
                f"{db.display}: PostgreSQL needs psycopg: pip install 'phonon-cli[postgres]'"
            ) from e
        extra = {} if "connect_timeout" in db.url else {"connect_timeout": 10}
        self.conn = psycopg.connect(db.url, autocommit=True, **extra)  # type: ignore[arg-type]

    @classmethod
    def check_name(cls, name: object, what: str) -> str:
        name = super().check_name(name, what)
        if len(name.encode()) > 63:  # PostgreSQL would silently truncate it
            raise SinkError(f"{what} {name!r} is longer than PostgreSQL's 63 bytes")
        return name

    def transaction(self) -> Any:
        return self.conn.transaction()

    def read(self, table: str) -> dict[str, Column] | None:
        rows = self.conn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod),"
            " COALESCE(a.attnum = ANY(i.indkey), false)"
            " FROM pg_attribute a LEFT JOIN pg_index i"
            " ON i.indrelid = a.attrelid AND i.indisprimary"
            " WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
            (self.quote(table),),
        ).fetchall()
        return {name: Column(name, self.kinds.get(t, "other"), pk) for name, t, pk in rows} or None

    def lock_table(self, table: str) -> None:
        # Two CREATE TABLE IF NOT EXISTS at once can both miss the table, and one then
        # fails on pg_type's unique index; a transaction-scoped advisory lock orders them.
        self.conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.' || %s))", (table,)
        )

    def add_columns(self, table: str, cols: list[tuple[str, str]]) -> None:
        # IF NOT EXISTS: another worker may add the same column between our read and now.
        adds = ", ".join(
            f"ADD COLUMN IF NOT EXISTS {self.quote(n)} {self.types[k]} NOT NULL DEFAULT 0"
            for n, k in cols
        )
        self.conn.execute(f"ALTER TABLE {self.quote(table)} {adds}")

    def widen(self, table: str, name: str) -> bool:
        # Else a float summed into BIGINT would be rounded, silently.
        self.conn.execute(
            f"ALTER TABLE {self.quote(table)} ALTER COLUMN {self.quote(name)} TYPE DOUBLE PRECISION"
        )
        return True

    def executemany(self, sql: str, params: list[tuple[Any, ...]]) -> None:
        # psycopg reads % as a placeholder even inside a quoted identifier.
        with self.conn.cursor() as cur:  # pipelined by psycopg: no round trip per row
            cur.executemany(sql.replace("%", "%%").replace(MARK, "%s"), params)


BACKENDS: dict[str, type[Connection]] = {"sqlite": SQLite, "postgresql": PostgreSQL}


@dataclass
class Row:
    """One executed update, checked, names folded as the database compares them."""

    update: Update
    table: str
    spec: dict[str, tuple[str, Any]]  # folded name -> (name, value)
    doc: dict[str, tuple[str, int | float]]


def prepare(c: type[Connection], u: Update) -> Row:
    """Check an update's names and values before any SQL is sent.

    Raises:
        SinkError: no collection, no spec, a bad identifier, a null key, a non-number.
    """
    table = c.check_name(u.collection, "collection")
    if not u.spec:
        raise SinkError(f"{table}: a Counter needs a non-empty spec (the primary key)")
    spec: dict[str, tuple[str, Any]] = {}
    for k, v in u.spec.items():
        if v is None or c.fold(c.check_name(k, f"{table}: spec key")) in spec:
            raise SinkError(f"{table}: spec {k!r} is null or repeated; a primary key cannot be")
        spec[c.fold(k)] = (k, orjson.dumps(v).decode() if isinstance(v, (dict, list)) else v)
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
    return Row(u, table, spec, doc)


def _coerce(col: Column, value: Any, table: str) -> Any:
    """A spec value as the existing key column stores it, so equal keys stay equal."""
    if col.kind == "text":
        return value if isinstance(value, str) else orjson.dumps(value).decode()
    if col.kind == "other" or (col.kind, _kind(value)) in FITS:
        return value
    raise SinkError(f"{table}: spec {col.name}={value!r} does not fit its {col.kind} column")


def _columns(c: Connection, table: str, first: Row) -> dict[str, Column]:
    """The table's columns: cached, else read, else created from the first row."""
    cols = c.tables.get(table) or c.read(table)
    if cols is None:
        c.lock_table(table)
        defs = [f"{c.quote(k)} {c.types[_kind(v)]} NOT NULL" for k, v in first.spec.values()]
        pk = ", ".join(c.quote(k) for k, _ in first.spec.values())
        c.conn.execute(
            f"CREATE TABLE IF NOT EXISTS {c.quote(table)} ({', '.join(defs)}, PRIMARY KEY ({pk}))"
        )
        cols = c.read(table)
        assert cols is not None
    c.tables[table] = cols
    return cols


def write_table(c: Connection, table: str, rows: list[Row]) -> Failures:
    """Upsert rows into one table inside the caller's transaction; return rejected rows."""
    cols = _columns(c, table, rows[0])
    keys = [f for f, col in cols.items() if col.pk]
    failures: Failures = []
    ready: list[tuple[tuple[Any, ...], Row]] = []
    wanted: dict[str, tuple[str, str]] = {}  # folded doc column -> (name, int|float)
    for row in rows:
        try:
            if set(row.spec) != set(keys):
                raise SinkError(
                    f"{table}: spec keys {sorted(k for k, _ in row.spec.values())} "
                    f"do not match the table's primary key "
                    f"{sorted(cols[k].name for k in keys)}"
                )
            key = tuple(_coerce(cols[k], row.spec[k][1], table) for k in keys)
            bad = [
                k
                for f, (k, _) in row.doc.items()
                if f in cols and (cols[f].pk or cols[f].kind not in ("int", "float"))
            ]
            if bad:
                raise SinkError(f"{table}: doc columns {bad} are not numeric")
        except SinkError as e:
            failures.append((row.update, e))
            continue
        ready.append((key, row))
        for f, (name, v) in row.doc.items():
            if f not in wanted or isinstance(v, float):
                wanted[f] = (wanted.get(f, (name, ""))[0], _kind(v))
    changed = False
    if any(f not in cols for f in wanted):
        cols = c.read(table) or cols  # another worker may have added some meanwhile
        c.add_columns(table, [w for f, w in wanted.items() if f not in cols])
        changed = True
    for f, (_, kind) in wanted.items():
        if kind == "float" and f in cols and cols[f].kind == "int":
            changed = c.widen(table, cols[f].name) or changed
    if changed:
        cols = c.tables[table] = c.read(table) or cols
    if failures:  # perhaps the schema was fixed by hand meanwhile: re-read it next time
        c.tables.pop(table, None)
    if not ready:
        return failures
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


def write(db: Database, updates: Sequence[Update]) -> Failures:
    """Write a batch for one database in one transaction: all of it, or none of it."""
    backend = BACKENDS[db.kind]
    failures: Failures = []
    by_table: dict[str, list[Row]] = {}
    for u in updates:
        try:
            row = prepare(backend, u)
        except SinkError as e:
            failures.append((u, e))
            continue
        by_table.setdefault(row.table, []).append(row)
    if not by_table:
        return failures
    try:
        c = thread_handle(db.url, lambda: backend(db))
        rejected: Failures = []
        with c.transaction():
            for table in sorted(by_table):
                rejected += write_table(c, table, by_table[table])
    except Exception as e:  # noqa: BLE001 - the whole transaction failed: so did every row
        discard(db.url)
        error = SinkError(f"{db.display}: {type(e).__name__}: {e}".rstrip())
        error.__cause__ = e
        return failures + [(r.update, error) for rows in by_table.values() for r in rows]
    return failures + rejected


@functools.lru_cache(maxsize=256)
def _checked_table(database: Any, collection: Any) -> str:
    """The validated table name; cached, as every new key of a route asks the same."""
    return BACKENDS[parse_database(database).kind].check_name(collection, "collection")


class Counter(ConflictFreeUpdate):
    """Sums per key in a SQL table: ``database`` is ``sqlite:///PATH`` or ``postgresql://...``,
    ``collection`` the table, ``spec`` its primary key, ``doc`` the numbers to add.

    Raises:
        SinkError: at construction, when the database URL, collection or spec is unusable
            (better at the first event than at the first write, half an hour later).
    """

    sqlite_busy_timeout_s: ClassVar[float] = 5.0
    """Seconds a SQLite write waits for another worker process's transaction to end."""

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
        table = _checked_table(database, collection)
        if not spec:
            raise SinkError(f"{table}: a Counter needs a non-empty spec (the primary key)")
        super().__init__(process, _id, database, collection, spec, doc, *args, **kwargs)

    def execute(self) -> None:
        failures = type(self).execute_many([self])
        if failures:
            raise failures[0][1]

    @classmethod
    def execute_many(cls, updates: Sequence[Update]) -> Failures:
        """One transaction per database; a failed transaction fails all its updates."""
        failures: Failures = []
        groups: dict[str, tuple[Database, list[Update]]] = {}
        for u in updates:
            try:
                db = parse_database(u.database)
            except SinkError as e:
                failures.append((u, e))
                continue
            groups.setdefault(db.url, (db, []))[1].append(u)
        for db, group in groups.values():
            failures += write(db, group)
        return failures
