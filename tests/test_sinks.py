"""The built-in sinks against real Redis and real databases (SQLite files, PostgreSQL)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from phonon_cli import SinkError
from phonon_cli.core.update import acquire_updates, end_sessions
from phonon_cli.sinks import close_all, parse_database
from phonon_cli.sinks import sql as sql_sink
from phonon_cli.sinks.jsonl import Lines
from phonon_cli.sinks.sql import Counter


@pytest.fixture(autouse=True)
def _close_connections() -> Iterator[None]:
    yield
    close_all()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/sub/counts.db"
    return str(request.getfixturevalue("postgres_url"))


def q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///") :]) as conn:
            rows = conn.execute(sql).fetchall()
        conn.close()
        return rows
    import psycopg

    with psycopg.connect(url) as pg:
        return pg.execute(sql).fetchall()


def rows(url: str, table: str) -> list[dict[str, Any]]:
    """Every row of ``table`` as a dict, in primary-key order."""
    if url.startswith("sqlite:///"):
        names = [r[1] for r in query(url, f"PRAGMA table_info({q(table)})")]
    else:
        names = [
            r[0]
            for r in query(
                url,
                "SELECT attname FROM pg_attribute WHERE attrelid = "
                f"to_regclass('{q(table)}') AND attnum > 0 ORDER BY attnum",
            )
        ]
    data = query(url, f"SELECT {', '.join(map(q, names))} FROM {q(table)} ORDER BY 1, 2")
    return [dict(zip(names, r, strict=True)) for r in data]


def test_an_empty_batch_writes_nothing_and_fails_nothing() -> None:
    assert [s.execute_many([]) for s in (Counter, Lines)] == [[], []]


def test_two_holders_write_one_summed_row_then_a_session_adds(make_process, db_url) -> None:
    p1, p2 = make_process(), make_process()
    spec = {"parent": 1, "target": 2}
    a = Counter(p1, "1.2", database=db_url, collection="widgets", spec=spec, doc={"clicks": 1})
    b = Counter(
        p2, "1.2", database=db_url, collection="widgets", spec=spec, doc={"clicks": 2, "views": 5}
    )
    assert a.end_session() is False
    assert b.end_session() is True
    assert rows(db_url, "widgets") == [{"parent": 1, "target": 2, "clicks": 3, "views": 5}]

    c = Counter(
        p2, "1.2", database=db_url, collection="widgets", spec=spec, doc={"clicks": 10, "shares": 4}
    )
    assert c.end_session() is True
    assert rows(db_url, "widgets") == [
        {"parent": 1, "target": 2, "clicks": 13, "views": 5, "shares": 4}
    ]
    assert (a.error, b.error, c.error) == (None, None, None)


def test_float_values_widen_an_integer_column(make_process, db_url) -> None:
    p = make_process()
    spec = {"k": "a"}
    Counter(p, "a", database=db_url, collection="t", spec=spec, doc={"n": 2}).end_session()
    Counter(p, "a", database=db_url, collection="t", spec=spec, doc={"n": 0.25}).end_session()
    Counter(p, "a", database=db_url, collection="t", spec=spec, doc={"n": 1}).end_session()
    assert rows(db_url, "t") == [{"k": "a", "n": 3.25}]


def test_spec_values_keep_their_type_and_nested_ones_are_json(make_process, db_url) -> None:
    p = make_process()
    spec = {"i": 7, "f": 1.5, "s": "x", "j": {"b": [1, 2]}}
    for n in (1, 2):
        u = Counter(p, "k", database=db_url, collection="typed", spec=spec, doc={"n": n})
        assert u.end_session() is True
    assert rows(db_url, "typed") == [{"i": 7, "f": 1.5, "s": "x", "j": '{"b":[1,2]}', "n": 3}]


def test_identifiers_from_data_are_quoted_never_executed(make_process, db_url) -> None:
    p = make_process()
    victim = Counter(p, "v", database=db_url, collection="victim", spec={"id": 1}, doc={"n": 1})
    assert victim.end_session() is True
    table = 'we"ird; DROP TABLE victim; --'
    key = 'pa"rent id'
    docs = {'it\'s "odd" % col': 2, "n) VALUES (1); DELETE FROM victim; --": 3, "%s": 4}
    u = Counter(p, "x", database=db_url, collection=table, spec={key: "a'b"}, doc=docs)
    assert u.end_session() is True
    assert u.error is None
    assert rows(db_url, table) == [{key: "a'b", **docs}]
    assert rows(db_url, "victim") == [{"id": 1, "n": 1}]


def test_a_bad_name_fails_its_own_update_only(make_process, db_url) -> None:
    p = make_process()
    good = Counter(
        p, "g", database=db_url, collection="t", spec={"k": "g"}, doc={"n": 1}, acquire=False
    )
    bad = Counter(
        p, "b", database=db_url, collection="t", spec={"k": "b"}, doc={"a\x00b": 1}, acquire=False
    )
    failures = Counter.execute_many([good, bad])
    assert [(u, type(e), str(e)) for u, e in failures] == [
        (bad, SinkError, "t: doc key 'a\\x00b' is not a valid SQL identifier (empty or NUL)")
    ]
    assert rows(db_url, "t") == [{"k": "g", "n": 1}]


def test_a_batch_of_1000_keys_is_one_call_and_one_transaction(
    make_process, db_url, monkeypatch
) -> None:
    p = make_process()
    backend = sql_sink.BACKENDS[parse_database(db_url).kind]
    calls: list[int] = []
    transactions: list[int] = []
    real_many, real_tx = Counter.execute_many.__func__, backend.transaction  # type: ignore[attr-defined]

    def counting_many(cls: type[Counter], updates: Any) -> Any:
        calls.append(len(updates))
        return real_many(cls, updates)

    def counting_tx(self: Any) -> Any:
        transactions.append(1)
        return real_tx(self)

    monkeypatch.setattr(Counter, "execute_many", classmethod(counting_many))
    monkeypatch.setattr(backend, "transaction", counting_tx)
    ups = [
        Counter(
            p,
            i,
            database=db_url,
            collection="many",
            spec={"k": i},
            doc={"n": i, "one": 1},
            acquire=False,
        )
        for i in range(1000)
    ]
    acquire_updates(ups)
    assert end_sessions(ups) == [True] * 1000
    assert (calls, transactions) == ([1000], [1])
    assert query(db_url, 'SELECT count(*), sum(n), sum(one), min(k), max(k) FROM "many"') == [
        (1000, 499500, 1000, 0, 999)
    ]


def test_threads_use_their_own_connections(make_process, db_url) -> None:
    p = make_process()
    errors: list[Any] = []

    def work(t: int) -> None:
        ups = [
            Counter(
                p,
                f"{t}-{i}",
                database=db_url,
                collection="th",
                spec={"k": i % 10},
                doc={"n": 1},
                acquire=False,
            )
            for i in range(100)
        ]
        errors.extend(Counter.execute_many(ups))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert rows(db_url, "th") == [{"k": k, "n": 40} for k in range(10)]


WRITER = """
import sys
from phonon_cli.core.process import Process
from phonon_cli.sinks import close_all
from phonon_cli.sinks.sql import Counter
redis_url, namespace, db, worker = sys.argv[1:5]
p = Process(redis_url=redis_url, namespace=namespace, start_heartbeat=False)
for batch in range(5):
    ups = [Counter(p, f"{worker}-{batch}-{i}", database=db, collection="mp", spec={"k": i % 20},
                   doc={"n": 1, f"w{worker}": 2}, acquire=False) for i in range(100)]
    failures = Counter.execute_many(ups)
    assert failures == [], repr(failures[0][1].__cause__)
close_all()
p.stop()
"""


def test_worker_processes_write_one_database_at_once(redis_url, namespace, db_url, helpers) -> None:
    procs = [
        helpers.python_process("-c", WRITER, redis_url, namespace, db_url, str(w)) for w in range(4)
    ]
    assert [proc.wait(timeout=60) for proc in procs] == [0, 0, 0, 0]
    assert rows(db_url, "mp") == [
        {"k": k, "n": 100, "w0": 50, "w1": 50, "w2": 50, "w3": 50} for k in range(20)
    ]


def test_sqlite_names_differing_in_case_are_one_column(make_process, tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/case.db"
    p = make_process()
    u = Counter(p, "k", database=url, collection="T", spec={"K": 1}, doc={"Clicks": 1, "clicks": 2})
    assert u.end_session() is True
    v = Counter(p, "k", database=url, collection="t", spec={"k": 1}, doc={"CLICKS": 4})
    assert v.end_session() is True
    assert rows(url, "t") == [{"K": 1, "Clicks": 7}]


@pytest.mark.parametrize("kind", ["sqlite-dir", "conflicting-schema", "closed-port"])
def test_a_failing_database_keeps_the_aggregate_in_redis(
    make_process, client, tmp_path, monkeypatch, kind
) -> None:
    monkeypatch.setattr(Counter, "execute_attempts", 1)
    url = {
        "sqlite-dir": f"sqlite:///{tmp_path}",  # a directory, not a database file
        "conflicting-schema": f"sqlite:///{tmp_path}/c.db",
        "closed-port": "postgresql://user:s3cret@127.0.0.1:1/test",
    }[kind]
    if kind == "conflicting-schema":
        query(url, 'CREATE TABLE "w" (other TEXT PRIMARY KEY)')
    p1, p2 = make_process(), make_process()
    a = Counter(p1, "k", database=url, collection="w", spec={"id": "k"}, doc={"n": 2, "m": 1})
    b = Counter(p2, "k", database=url, collection="w", spec={"id": "k"}, doc={"n": 3})
    assert a.end_session() is False
    assert b.end_session() is False
    assert isinstance(b.error, SinkError)
    message = str(b.error)
    assert "s3cret" not in message
    expected = {
        "sqlite-dir": f"sqlite:///{tmp_path}: OperationalError: unable to open database file",
        "conflicting-schema": "w: spec keys ['id'] do not match the table's primary key ['other']",
        "closed-port": "postgresql://user:***@127.0.0.1:1/test: OperationalError: ",
    }
    assert message.startswith(expected[kind])
    keys = p1.keys.resource(b.resource)
    partials = keys.partials
    if kind == "conflicting-schema":
        # Not the database's passing state but the aggregate's own fault: quarantined
        # whole (both workers' partials), with the error, and nothing left waiting.
        (record,) = [orjson.loads(r) for r in client.lrange(keys.quarantine, 0, -1)]
        assert (record["kind"], record["payload"], record["error"]) == (
            "sums",
            "n\t5\nm\t1\n",
            message,
        )
        assert client.exists(partials, keys.nodes, keys.meta) == 0
        return
    assert client.hgetall(partials) == {"n": "5", "m": "1"}

    # Nothing was lost: once the database is up, the next holder writes it all.
    if kind != "sqlite-dir":
        return
    (tmp_path / "w.db").touch()
    url = f"sqlite:///{tmp_path}/w.db"
    c = Counter(
        p1, "k", database=url, collection="w", spec={"id": "k"}, doc={"n": 10}, init_cache=True
    )
    assert c.end_session() is True
    assert rows(url, "w") == [{"id": "k", "n": 15, "m": 1}]
    assert client.exists(partials) == 0


@pytest.mark.parametrize(
    "url, kind, path",
    [
        ("sqlite:///rel/counts.db", "sqlite", "rel/counts.db"),
        ("sqlite:////abs/counts.db", "sqlite", "/abs/counts.db"),
        ("postgresql://u:pw@db/x", "postgresql", None),
        ("postgres://db/x", "postgresql", None),
    ],
)
def test_parse_database(url, kind, path) -> None:
    db = parse_database(url)
    assert (db.kind, db.url, db.path) == (kind, url, path)


@pytest.mark.parametrize(
    "url, message",
    [
        (
            "sqlite:///:memory:",
            "database sqlite:///:memory:: an in-memory or empty SQLite path "
            "cannot be shared between workers; give a file path",
        ),
        (
            "sqlite:///",
            "database sqlite:///: an in-memory or empty SQLite path cannot be shared "
            "between workers; give a file path",
        ),
        (
            "mysql://u:pw@h/db",
            "database mysql://u:***@h/db: expected sqlite:///PATH (relative), "
            "sqlite:////PATH (absolute) or postgresql://...",
        ),
        (None, "database None: expected sqlite:///PATH or postgresql://..."),
    ],
)
def test_parse_database_refuses(url, message) -> None:
    with pytest.raises(SinkError) as e:
        parse_database(url)
    assert str(e.value) == message


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"collection": None, "spec": {"k": 1}},
            "collection None is not a valid SQL identifier (empty or NUL)",
        ),
        (
            {"collection": "t", "spec": {}},
            "t: the Counter sink needs a non-empty spec (the primary key)",
        ),
    ],
)
def test_counter_refuses_a_config_it_cannot_write(make_process, client, kwargs, message) -> None:
    p = make_process()
    with pytest.raises(SinkError) as e:
        Counter(p, "k", database="sqlite:///x.db", doc={"n": 1}, **kwargs)
    assert str(e.value) == message
    assert client.smembers(p.keys.held(p.id)) == set()


def test_lines_appends_to_a_file(make_process, tmp_path) -> None:
    p1, p2 = make_process(), make_process()
    path = tmp_path / "out" / "agg.jsonl"
    a = Lines(p1, "1.2", database=str(path), collection="w", spec={"p": 1}, doc={"c": 1})
    b = Lines(p2, "1.2", database=str(path), collection="w", spec={"p": 1}, doc={"c": 2, "v": 1})
    assert (a.end_session(), b.end_session()) == (False, True)
    c = Lines(p1, 7, database=str(path), collection="w", spec={}, doc={"c": 0.5})
    assert c.end_session() is True
    assert path.read_bytes() == (
        b'{"id":"1.2","collection":"w","spec":{"p":1},"doc":{"c":3,"v":1}}\n'
        b'{"id":7,"collection":"w","spec":{},"doc":{"c":0.5}}\n'
    )


def test_lines_writes_a_batch_to_stdout(make_process, capsys) -> None:
    p = make_process()
    ups = [
        Lines(p, i, database="-", collection="w", spec={"i": i}, doc={"n": i}, acquire=False)
        for i in range(3)
    ]
    ups.append(Lines(p, "none", collection="w", doc={"n": 1}, acquire=False))
    acquire_updates(ups)
    assert end_sessions(ups) == [True] * 4
    out = capsys.readouterr()
    assert out.out == (
        '{"id":0,"collection":"w","spec":{"i":0},"doc":{"n":0}}\n'
        '{"id":1,"collection":"w","spec":{"i":1},"doc":{"n":1}}\n'
        '{"id":2,"collection":"w","spec":{"i":2},"doc":{"n":2}}\n'
        '{"id":"none","collection":"w","spec":{},"doc":{"n":1}}\n'
    )
    assert out.err == ""


def test_lines_failure_keeps_the_aggregate(make_process, client, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(Lines, "execute_attempts", 1)
    p = make_process()
    u = Lines(p, "k", database=str(tmp_path), collection="w", doc={"n": 4})  # a directory
    assert u.end_session() is False
    assert str(u.error).startswith(f"{tmp_path}: cannot write: [Errno 21] Is a directory")
    assert client.hgetall(p.keys.resource(u.resource).partials) == {"n": "4"}
