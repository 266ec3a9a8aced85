"""What the SQL sinks share: the SQLite and PostgreSQL backends, identifier
quoting, the schema cache, table creation and the one-transaction-per-batch write.

``sql.Counter`` (sums, upserted) and ``sql.Aggregate`` (per-field strategies,
merged with the row) differ only in how a row combines with what the table
holds; everything about connecting, naming and transactions is here, once.

Names come from event data (``{event_type}`` as a column), so every identifier
is quoted (double quotes, inner quotes doubled) and NUL is refused: data can
name a column, never write SQL. The schema is read once per connection and
cached. After a failed transaction the connection and its cache are dropped: a
rolled-back ``ALTER TABLE`` would otherwise leave the cache believing in a
column that does not exist.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import orjson

from .. import defaults
from ..exceptions import SinkError
from ..store.connection import strip_secrets
from . import Database, discard, parse_database, thread_handle

if TYPE_CHECKING:
    from ..core.update import Failures, Update

log = logging.getLogger(__name__)

INT64 = 2**63
MARK = "\x00"
"""Placeholder in built SQL, swapped for the driver's: NUL is never in a name (``check_name``)."""
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@dataclass
class Column:
    name: str
    kind: str  # int | float | text | bool | json | other
    pk: bool = False


FITS = {("int", "int"), ("int", "bool"), ("float", "float"), ("float", "int"), ("bool", "bool")}
"""(column kind, value kind) pairs a key column takes as they are."""


def value_kind(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float"}.get(type(value), "text")


class Connection:
    """One thread's connection to one database, and what it knows of the schema.
    Subclasses hold what differs between SQLite and PostgreSQL."""

    types: ClassVar[dict[str, str]]
    """Value kind -> SQL type. ``json``: a JSON document; ``any``: a value of any
    JSON type (SQLite keeps strings and numbers as they are)."""
    json_param: ClassVar[str] = MARK
    max_columns: ClassVar[int] = 1600
    """Columns a table may have: a row needing more can never be written, and is
    refused before any SQL (SQLite takes ~10 s to fail 2,000 ALTER TABLEs)."""
    """The placeholder of a JSON column's parameter (given as JSON text)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.conn: Any = None
        self.tables: dict[str, dict[str, Column]] = {}
        """Table -> folded column name -> column."""
        self.applied_ready = False
        """``phonon_applied`` exists (and was pruned) on this connection."""

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

    def add_columns(self, table: str, cols: list[tuple[str, str]], nullable: bool = False) -> None:
        """Add columns; numbers default to 0 (sums), or to NULL (``nullable``: never set)."""
        for name, kind in cols:
            self.conn.execute(
                f"ALTER TABLE {self.quote(table)} ADD COLUMN {self.column(name, kind, nullable)}"
            )

    def column(self, name: str, kind: str, nullable: bool = True) -> str:
        """A column definition: NULL when nothing was ever stored, or ``NOT NULL DEFAULT 0``."""
        return f"{self.quote(name)} {self.types[kind]}" + (
            "" if nullable else " NOT NULL DEFAULT 0"
        )

    def load_json(self, value: Any) -> Any:
        """A JSON column's value as read (SQLite: text; psycopg parses JSONB itself)."""
        return None if value is None else orjson.loads(value)

    def dump_any(self, value: Any) -> Any:
        """A value of any JSON type for an ``any`` column (see ``load_any``)."""
        return orjson.dumps(value).decode()

    def load_any(self, value: Any) -> Any:
        return self.load_json(value)

    def widen(self, table: str, name: str) -> bool:
        """Make an integer doc column hold floats; True if the schema changed."""
        return False  # SQLite's INTEGER affinity keeps a non-integral value as REAL

    def executemany(self, sql: str, params: list[tuple[Any, ...]]) -> None:
        self.conn.executemany(sql.replace(MARK, "?"), params)

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql.replace(MARK, "?"), params).fetchall()  # type: ignore[no-any-return]


class SQLite(Connection):
    types: ClassVar[dict[str, str]] = {
        "int": "INTEGER",
        "float": "REAL",
        "text": "TEXT",
        "bool": "INTEGER",
        "json": "TEXT",
        "any": "",  # no type: SQLite stores each value as it is given
    }
    busy_timeout_s: ClassVar[float] = 5.0
    max_columns: ClassVar[int] = 2000  # SQLITE_MAX_COLUMN's default
    """Seconds a write waits for another worker process's transaction to end."""

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
        timeout_s = self.busy_timeout_s
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
    @functools.lru_cache(maxsize=4096)  # the same few column names, for every key
    def fold(name: str) -> str:
        return name.translate(_ASCII_LOWER)  # SQLite ignores ASCII case, and only that

    def dump_any(self, value: Any) -> Any:
        # Strings and numbers as themselves, so SQL sees them plainly; anything else
        # (true/false, objects, arrays) as JSON in a BLOB, so a string that merely
        # looks like JSON is never mistaken for one when the row is read back.
        if value is None or value.__class__ in (str, int, float):
            return value
        return orjson.dumps(value)

    def load_any(self, value: Any) -> Any:
        return orjson.loads(value) if isinstance(value, bytes) else value

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
        "json": "JSONB",
        "any": "JSONB",
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
        "jsonb": "json",
    }
    json_param: ClassVar[str] = f"CAST({MARK} AS JSONB)"

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

    def add_columns(self, table: str, cols: list[tuple[str, str]], nullable: bool = False) -> None:
        # IF NOT EXISTS: another worker may add the same column between our read and now.
        adds = ", ".join(f"ADD COLUMN IF NOT EXISTS {self.column(n, k, nullable)}" for n, k in cols)
        self.conn.execute(f"ALTER TABLE {self.quote(table)} {adds}")

    def widen(self, table: str, name: str) -> bool:
        # Else a float summed into BIGINT would be rounded, silently.
        self.conn.execute(
            f"ALTER TABLE {self.quote(table)} ALTER COLUMN {self.quote(name)} TYPE DOUBLE PRECISION"
        )
        return True

    def load_json(self, value: Any) -> Any:
        return value  # psycopg has parsed it already

    def executemany(self, sql: str, params: list[tuple[Any, ...]]) -> None:
        # psycopg reads % as a placeholder even inside a quoted identifier.
        with self.conn.cursor() as cur:  # pipelined by psycopg: no round trip per row
            cur.executemany(sql.replace("%", "%%").replace(MARK, "%s"), params)

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql.replace("%", "%%").replace(MARK, "%s"), params).fetchall()  # type: ignore[no-any-return]


BACKENDS: dict[str, type[Connection]] = {"sqlite": SQLite, "postgresql": PostgreSQL}


class Prepared(Protocol):
    """A checked update, ready for its table (each sink has its own ``Row``)."""

    update: Update
    table: str
    spec: dict[str, tuple[str, Any]]
    """Folded key column -> (column name, value)."""
    wanted: dict[str, tuple[str, str]]
    """Folded column it writes (beyond the key) -> (column name, kind)."""


P = TypeVar("P", bound=Prepared)


def check_spec(c: type[Connection], table: str, u: Update, what: str) -> dict[str, tuple[str, Any]]:
    """The update's spec as key columns: folded name -> (name, value).

    Raises:
        SinkError: no spec, a bad identifier, a null or repeated key.
    """
    if not u.spec:
        raise SinkError(f"{table}: a {what} needs a non-empty spec (the primary key)")
    spec: dict[str, tuple[str, Any]] = {}
    for k, v in u.spec.items():
        if v is None or c.fold(c.check_name(k, f"{table}: spec key")) in spec:
            raise SinkError(f"{table}: spec {k!r} is null or repeated; a primary key cannot be")
        spec[c.fold(k)] = (k, orjson.dumps(v).decode() if isinstance(v, (dict, list)) else v)
    return spec


def coerce(col: Column, value: Any, table: str) -> Any:
    """A spec value as the existing key column stores it, so equal keys stay equal."""
    if col.kind == "text":
        return value if isinstance(value, str) else orjson.dumps(value).decode()
    if col.kind == "other" or (col.kind, value_kind(value)) in FITS:
        return value
    raise SinkError(f"{table}: spec {col.name}={value!r} does not fit its {col.kind} column")


def row_key(cols: dict[str, Column], row: Prepared) -> tuple[Any, ...]:
    """The row's primary key, in the table's key column order.

    Raises:
        SinkError: the spec names other columns than the table's key, or a value
            does not fit its column.
    """
    keys = key_columns(cols)
    if set(row.spec) != set(keys):
        raise SinkError(
            f"{row.table}: spec keys {sorted(k for k, _ in row.spec.values())} "
            f"do not match the table's primary key {sorted(cols[k].name for k in keys)}"
        )
    return tuple(coerce(cols[k], row.spec[k][1], row.table) for k in keys)


def admit_rows(
    c: Connection,
    table: str,
    cols: dict[str, Column],
    rows: list[P],
    suits: Callable[[str, str], bool],
    nullable: bool = False,
) -> tuple[list[tuple[tuple[Any, ...], P]], Failures, dict[str, Column]]:
    """The rows a table can take, each with its key, after adding the columns they need.

    Both SQL sinks begin a table's batch so: a row fails alone (the others are
    written) when its spec does not match the table's primary key or a column it
    writes has a kind that cannot hold its value (``suits(column kind, kind
    wanted)`` is false, or it is a key column).

    Returns:
        ``(ready, failures, columns)``: ``ready`` as ``(key, row)``; ``columns``
        the table's (``cols``), the added ones included.
    """
    failures: Failures = []
    ready: list[tuple[tuple[Any, ...], P]] = []
    wanted: dict[str, tuple[str, str]] = {}
    checked: dict[int, list[str]] = {}  # rows often share one ``wanted`` (sqlfields)
    for row in rows:
        try:
            key = row_key(cols, row)
            bad = checked.get(id(row.wanted))
            if bad is None:
                bad = checked[id(row.wanted)] = [
                    name
                    for f, (name, kind) in row.wanted.items()
                    if f in cols and (cols[f].pk or not suits(cols[f].kind, kind))
                ]
                for f, (name, kind) in row.wanted.items() if not bad else ():
                    if f not in wanted or kind == "float":
                        wanted[f] = (wanted[f][0] if f in wanted else name, kind)
            if bad:
                raise SinkError(f"{table}: columns {bad} cannot hold what they are given")
        except SinkError as e:
            failures.append((row.update, e))
            continue
        ready.append((key, row))
    cols = ensure_columns(c, table, cols, wanted, nullable)
    if failures:  # perhaps the schema was fixed by hand meanwhile: re-read it next time
        c.tables.pop(table, None)
    return ready, failures, cols


def key_columns(cols: dict[str, Column]) -> list[str]:
    """The folded names of the primary key's columns, in table order."""
    return [f for f, col in cols.items() if col.pk]


def ensure_columns(
    c: Connection,
    table: str,
    cols: dict[str, Column],
    wanted: dict[str, tuple[str, str]],
    nullable: bool = False,
) -> dict[str, Column]:
    """Add the ``wanted`` columns (folded name -> (name, kind)) the table lacks, and
    widen integer columns that must now hold floats; return the columns."""
    changed = False
    if any(f not in cols for f in wanted):
        cols = c.read(table) or cols  # another worker may have added some meanwhile
        c.add_columns(table, [w for f, w in wanted.items() if f not in cols], nullable)
        changed = True
    for f, (_, kind) in wanted.items():
        if kind == "float" and f in cols and cols[f].kind == "int":
            changed = c.widen(table, cols[f].name) or changed
    if changed:
        cols = c.tables[table] = c.read(table) or cols
    return cols


def columns(
    c: Connection, table: str, spec: dict[str, tuple[str, Any]], more: Sequence[str] = ()
) -> dict[str, Column]:
    """The table's columns: cached, else read, else created with ``spec`` as its
    primary key (types from the values) and ``more`` (column definitions)."""
    cols = c.tables.get(table) or c.read(table)
    if cols is None:
        c.lock_table(table)
        defs = [f"{c.quote(k)} {c.types[value_kind(v)]} NOT NULL" for k, v in spec.values()]
        pk = ", ".join(c.quote(k) for k, _ in spec.values())
        c.conn.execute(
            f"CREATE TABLE IF NOT EXISTS {c.quote(table)} "
            f"({', '.join([*defs, *more])}, PRIMARY KEY ({pk}))"
        )
        cols = c.read(table)
        assert cols is not None
    c.tables[table] = cols
    return cols


APPLIED = "phonon_applied"
"""The table of execution ids written, in every database a SQL sink writes to."""


def already_applied(c: Connection, ids: list[str]) -> set[str]:
    """Of ``ids``, those already written (a set executed twice: a paused worker and
    the survivor that recovered it, or a crash between commit and Redis cleanup).

    Called inside the batch's transaction; ``record_applied`` adds the new ones in
    the same transaction, so a set's rows and its id commit together or not at all.
    Two workers writing the same set at once both insert its id: the primary key
    makes one of the transactions fail, and its retry finds the id recorded.
    """
    if not c.applied_ready:
        c.lock_table(APPLIED)
        c.conn.execute(
            f"CREATE TABLE IF NOT EXISTS {APPLIED} "
            "(id TEXT PRIMARY KEY, applied_ms BIGINT NOT NULL)"
        )
        oldest = int(time.time() * 1000) - int(defaults.APPLIED_RETENTION_S * 1000)
        c.executemany(f"DELETE FROM {APPLIED} WHERE applied_ms < {MARK}", [(oldest,)])
        c.applied_ready = True
    found: set[str] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ", ".join([MARK] * len(chunk))
        rows = c.query(f"SELECT id FROM {APPLIED} WHERE id IN ({marks})", chunk)
        found.update(row[0] for row in rows)
    if found:
        log.info("%s: %d sets were written already; not again", c.db.display, len(found))
    return found


def record_applied(c: Connection, ids: list[str]) -> None:
    if ids:
        now = int(time.time() * 1000)
        c.executemany(
            f"INSERT INTO {APPLIED} (id, applied_ms) VALUES ({MARK}, {MARK})",
            [(i, now) for i in ids],
        )


def write(
    db: Database,
    updates: Sequence[Update],
    prepare: Callable[[type[Connection], Update], P],
    write_table: Callable[[Connection, str, list[P]], Failures],
) -> Failures:
    """Write a batch for one database in one transaction: all of it, or none of it.

    Args:
        prepare: checks an update before any SQL is sent (raises ``SinkError``).
        write_table: writes one table's rows inside the transaction; returns the
            rows it rejected (they fail alone; the others are written).
    """
    backend = BACKENDS[db.kind]
    failures: Failures = []
    by_table: dict[str, list[P]] = {}
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
            ids = [r.update.execution_id for rows in by_table.values() for r in rows]
            done = already_applied(c, [i for i in ids if i is not None])
            for table in sorted(by_table):  # one order in every worker: no deadlock
                rows = [r for r in by_table[table] if r.update.execution_id not in done]
                if rows:
                    rejected += write_table(c, table, rows)
            failed = {id(u) for u, _ in rejected}
            record_applied(
                c,
                [
                    r.update.execution_id
                    for rows in by_table.values()
                    for r in rows
                    if r.update.execution_id is not None
                    and r.update.execution_id not in done
                    and id(r.update) not in failed
                ],
            )
    except Exception as e:  # noqa: BLE001 - the whole transaction failed: so did every row
        discard(db.url)
        reason = strip_secrets(str(e), db.url)  # a driver may quote what it was given
        error = SinkError(f"{db.display}: {type(e).__name__}: {reason}".rstrip())
        error.__cause__ = e
        return failures + [(r.update, error) for rows in by_table.values() for r in rows]
    return failures + rejected


def execute_by_database(
    updates: Sequence[Update], write_db: Callable[[Database, list[Update]], Failures]
) -> Failures:
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
        failures += write_db(db, group)
    return failures


PG_EXTRA = "'phonon-cli[postgres]'"


def probe(database: Any) -> str:
    """Reach a route's database without creating anything (``phonon check --connect``):
    what was found, in a few words.

    Raises:
        SinkError: it cannot be reached (the message names it without its password).
    """
    db = parse_database(database)
    return _probe_sqlite(db) if db.kind == "sqlite" else _probe_postgres(db)


def _probe_sqlite(db: Database) -> str:
    assert db.path is not None
    path = os.path.abspath(db.path)
    if not os.path.exists(path):
        parent = os.path.dirname(path)
        while parent and not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent or ".", os.W_OK):
            raise SinkError(f"{db.display}: not there, and {parent} is not writable")
        return "SQLite file not there yet: the first write creates it"
    try:  # mode=rw: never create the file
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=1.0)
        try:
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise SinkError(f"{db.display}: {e}") from e
    return f"SQLite, {tables} table(s) and indexes"


def _probe_postgres(db: Database) -> str:
    try:
        import psycopg
    except ImportError as e:
        raise SinkError(f"{db.display}: PostgreSQL needs psycopg: pip install {PG_EXTRA}") from e
    extra = {} if "connect_timeout" in db.url else {"connect_timeout": 10}
    try:
        with psycopg.connect(db.url, autocommit=True, **extra) as pg:  # type: ignore[arg-type]
            version = pg.execute("SHOW server_version").fetchone()
    except psycopg.Error as e:
        raise SinkError(f"{db.display}: {str(e).strip().splitlines()[0]}") from e
    return f"PostgreSQL {version[0] if version else '?'}"


@functools.lru_cache(maxsize=256)
def checked_table(database: Any, collection: Any) -> str:
    """The validated table name; cached, as every new key of a route asks the same."""
    return BACKENDS[parse_database(database).kind].check_name(collection, "collection")
