"""Routes with ``fields`` end to end: the SQL Aggregate sink, real ``phonon run``
processes with tiny caches, flush triggers, config errors, the sessions example."""

from __future__ import annotations

import json
import random
import re
import sqlite3
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aggregates import FIELDS, canonical, expected, fields_toml

from phonon_cli.config import Config
from phonon_cli.fields import hll
from phonon_cli.fields.aggregate import event_slots
from phonon_cli.fields.strategies import merge_slot
from phonon_cli.sinks import close_all

ROOT = Path(__file__).parent.parent
PHONON = [sys.executable, "-m", "phonon_cli"]


@pytest.fixture(autouse=True)
def _close_connections() -> Iterator[None]:
    yield
    close_all()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/agg.db"
    return str(request.getfixturevalue("postgres_url"))


def route_toml(database: str, extra: str = "", fields: str | None = None) -> str:
    return (
        "[[routes]]\n"
        'update = "phonon_cli.sinks.sql:Aggregate"\n'
        'id = "{user}"\n'
        'collection = "sessions"\n'
        f"database = {json.dumps(database)}\n"
        'spec = { user = "{user}" }\n' + (fields_toml() if fields is None else fields) + extra
    )


def rows(url: str, table: str = "sessions") -> dict[Any, dict[str, Any]]:
    """Every row, by its first column, with JSON columns decoded (TEXT in SQLite)."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///") :]) as conn:
            cur = conn.execute(f'SELECT * FROM "{table}"')
            names = [d[0] for d in cur.description]
            types = {r[1]: r[2] for r in conn.execute(f'PRAGMA table_info("{table}")')}
            out = {}
            for row in cur.fetchall():
                record = {
                    n: orjson.loads(v)
                    if types[n] == "TEXT" and n.endswith(JSON) and v is not None
                    else v
                    for n, v in zip(names, row)
                }
                out[row[0]] = record
            return out
    import psycopg

    with psycopg.connect(url) as conn:
        cur = conn.execute(f'SELECT * FROM "{table}"')
        names = [d.name for d in cur.description or ()]
        return {row[0]: dict(zip(names, row)) for row in cur.fetchall()}


JSON = ("pages", "trail", "history", "biggest", "trail__at", "history__at", "path", "path__at")
"""Columns holding JSON documents in these tests (the others are plain values)."""


def events(n: int, users: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "user": f"u{rng.randrange(users)}",
            "amount": rng.randrange(-50, 500),
            "page": rng.choice(["/", "/a", "/b", "/c", "/é", "/x y"]),
            "ts": i // 3,  # ties: three events per time
            "visitor": rng.choice([rng.randrange(30), f"v{rng.randrange(10)}"]),
        }
        for i in range(n)
    ]


def lines(evs: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(e) + b"\n" for e in evs)


def registers_text(values: list[Any]) -> str:
    registers: hll.Registers = {}
    for v in values:
        hll.add(registers, canonical(v))
    return hll.encode(registers)


def assert_matches(got: dict[Any, dict[str, Any]], evs: list[dict[str, Any]]) -> None:
    """The table equals the independent computation, field by field."""
    want = expected(evs)
    assert set(got) == set(want)
    for user, row in got.items():
        w = dict(want[user])
        visitors = w.pop("visitors")
        assert {k: row[k] for k in w} == w, user
        assert abs(row["visitors"] - visitors) <= max(1, visitors // 20)
        assert row["visitors__hll"] == registers_text(
            [e["visitor"] for e in evs if e["user"] == user]
        )
        assert (row["avg__sum"], row["avg__count"]) == (w["revenue"], w["events"])


def phonon(*args: str, redis_url: str, namespace: str, **kwargs: Any) -> list[str]:
    return [*PHONON, "--redis-url", redis_url, "--namespace", namespace, *args]


# -- the sink, library level ------------------------------------------------------------------


def test_sessions_combine_with_the_row_and_columns_are_typed(
    make_process: Any, db_url: str
) -> None:
    route = Config.from_mapping(
        {
            "routes": [
                {
                    "update": "phonon_cli.sinks.sql:Aggregate",
                    "id": "{user}",
                    "collection": "sessions",
                    "database": db_url,
                    "spec": {"user": "{user}"},
                    "fields": FIELDS,
                }
            ]
        }
    ).routes[0]
    process = make_process()
    evs = events(60, 2, seed=1)
    for session in (evs[:25], evs[25:40], evs[40:]):  # three sessions per key
        built: dict[str, Any] = {}
        for e in session:
            id_, spec, doc = route.build(e)
            if id_ in built:
                built[id_].merge_event(doc)
            else:
                built[id_] = route.update(
                    process,
                    id_,
                    database=db_url,
                    collection="sessions",
                    spec=spec,
                    doc=event_slots(route.declared, doc),
                    fields=[f.field for f in route.fields],
                    acquire=False,
                )
        updates = list(built.values())
        assert route.update.execute_many(updates) == []
    assert_matches(rows(db_url), evs)
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url[len("sqlite:///") :]) as conn:
            types = dict(
                conn.execute("SELECT name, type FROM pragma_table_info('sessions')").fetchall()
            )
            stored = conn.execute(
                "SELECT typeof(revenue), typeof(avg), typeof(pages), typeof(entry), "
                "typeof(visitors__hll) FROM sessions LIMIT 1"
            ).fetchone()
        assert stored == ("integer", "real", "text", "text", "text")
        assert (types["pages"], types["entry"], types["avg"]) == ("TEXT", "", "REAL")
    else:
        import psycopg

        with psycopg.connect(db_url) as conn:
            types = dict(
                conn.execute(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_name = 'sessions'"
                ).fetchall()
            )
        assert (types["revenue"], types["pages"], types["entry"], types["avg"]) == (
            "bigint",
            "jsonb",
            "jsonb",
            "double precision",
        )


def test_first_last_of_any_json_type_round_trip(make_process: Any, db_url: str) -> None:
    fields = {
        "first_v": {"value": "{v}", "merge": "first", "by": "{t}"},
        "last_v": {"value": "{v}", "merge": "last", "by": "{t}"},
    }
    route = Config.from_mapping(
        {
            "routes": [
                {
                    "update": "phonon_cli.sinks.sql:Aggregate",
                    "id": "{user}",
                    "collection": "anyv",
                    "database": db_url,
                    "spec": {"user": "{user}"},
                    "fields": fields,
                }
            ]
        }
    ).routes[0]
    process = make_process()
    sessions = [
        [{"user": 1, "v": {"b": [1, "x"], "a": None}, "t": 5}, {"user": 2, "v": "[1]", "t": 1}],
        [{"user": 1, "v": True, "t": 9}, {"user": 2, "v": 2.5, "t": 1}],
        [{"user": 1, "v": '{"s": 1}', "t": 0}, {"user": 2, "v": [3], "t": 7}],
    ]
    for session in sessions:
        updates = []
        for e in session:
            id_, spec, doc = route.build(e)
            updates.append(
                route.update(
                    process,
                    id_,
                    database=db_url,
                    collection="anyv",
                    spec=spec,
                    doc=event_slots(route.declared, doc),
                    fields=[f.field for f in route.fields],
                    acquire=False,
                )
            )
        assert route.update.execute_many(updates) == []
    got = rows(db_url, "anyv")
    loads = (
        (lambda v: orjson.loads(v) if isinstance(v, bytes) else v) if "sqlite" in db_url else None
    )
    decoded = {
        u: (loads(r["first_v"]), loads(r["last_v"])) if loads else (r["first_v"], r["last_v"])
        for u, r in got.items()
    }
    # user 2: t=1 ties between "[1]" and 2.5: first takes the smaller JSON text ("\"[1]\""
    # sorts before "2.5"), last the larger.
    assert decoded == {1: ('{"s": 1}', True), 2: ("[1]", [3])}
    assert (got[1]["first_v__at"], got[1]["last_v__at"], got[2]["first_v__at"]) == (0, 9, 1)


# -- several real workers ---------------------------------------------------------------------


def run_split(
    cfg: Path, evs: list[dict[str, Any]], redis_url: str, namespace: str, workers: int = 3
) -> tuple[int, int]:
    """Split the events randomly among ``workers`` concurrent ``phonon run`` processes;
    return how many keys they executed and cached (deposited in Redis) in all."""
    rng = random.Random(len(evs))
    shares: list[list[dict[str, Any]]] = [[] for _ in range(workers)]
    for e in evs:
        shares[rng.randrange(workers)].append(e)
    procs = []
    for i, share in enumerate(shares):
        # Input from files, so that every worker reads from its start and they overlap.
        path = cfg.parent / f"share{i}.jsonl"
        path.write_bytes(lines(share))
        with path.open("rb") as stdin:
            procs.append(
                subprocess.Popen(
                    phonon(
                        "run",
                        "-c",
                        str(cfg),
                        "--max-entries",
                        "3",
                        redis_url=redis_url,
                        namespace=namespace,
                    ),
                    stdin=stdin,
                    stderr=subprocess.PIPE,
                )
            )
    results = [p.communicate(timeout=60) for p in procs]
    executed = cached = 0
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err.decode()
        assert b"dead-lettered 0" in err
        found = re.search(rb"keys executed (\d+), cached (\d+)", err)
        assert found is not None, err.decode()
        executed, cached = executed + int(found[1]), cached + int(found[2])
    return executed, cached


@pytest.mark.slow
def test_three_workers_tiny_caches_every_strategy(
    redis_url: str, namespace: str, db_url: str, tmp_path: Path, helpers: Any, client: Any
) -> None:
    cfg = tmp_path / "agg.toml"
    cfg.write_text(route_toml(db_url))
    evs = events(6000, 25, seed=5)
    executed, cached = run_split(cfg, evs, redis_url, namespace)
    # Many sessions per key, so rows combine in SQL; and partials merged in Redis.
    assert executed > 4 * 25 and cached > 100
    assert_matches(rows(db_url), evs)
    assert helpers.namespace_keys(client, namespace) == []  # nothing left behind in Redis


def test_second_run_combines_with_the_first(
    redis_url: str, namespace: str, tmp_path: Path, helpers: Any, client: Any
) -> None:
    url = f"sqlite:///{tmp_path}/twice.db"
    cfg = tmp_path / "agg.toml"
    cfg.write_text(route_toml(url))
    evs = events(400, 7, seed=9)
    for half in (evs[:200], evs[200:]):
        result = subprocess.run(
            phonon("run", "-c", str(cfg), redis_url=redis_url, namespace=namespace),
            input=lines(half),
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr.decode()
    assert_matches(rows(url), evs)


def test_nulls_follow_sql_in_the_table_and_the_summary(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/nulls.db"
    cfg = tmp_path / "agg.toml"
    cfg.write_text(route_toml(url))
    evs = events(300, 6, seed=3)
    rng = random.Random(4)
    for e in evs:
        for name in ("amount", "page", "visitor"):
            if rng.random() < 0.3:
                e[name] = None
    evs.append({"user": "all-null", "amount": None, "page": None, "ts": 1, "visitor": None})
    result = subprocess.run(
        phonon(
            "run", "-c", str(cfg), "--max-entries", "2", redis_url=redis_url, namespace=namespace
        ),
        input=lines(evs),
        capture_output=True,
        timeout=60,
    )
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert "dead-lettered 0" in err
    # Per event: amount skipped by revenue, low, high, biggest, avg; page by pages and
    # (if amount is not null) biggest; visitor by visitors.
    skipped = sum(
        5 * (e["amount"] is None)
        + (e["page"] is None) * (1 + (e["amount"] is not None))
        + (e["visitor"] is None)
        for e in evs
    )
    assert f"nulls skipped: routes[0] {skipped}" in err
    got, want = rows(url), expected(evs)
    assert set(got) == set(want)
    for user, row in got.items():
        w = dict(want[user])
        visitors = w.pop("visitors")
        assert {k: row.get(k) for k in w} == w, user
        assert (row.get("visitors") is None) == (visitors is None)
        assert abs((row.get("visitors") or 0) - (visitors or 0)) <= max(1, (visitors or 0) // 20)
    assert got["all-null"]["events"] == 1 and got["all-null"]["history"] == [None]


# -- flush triggers ---------------------------------------------------------------------------


def _counts(url: str) -> dict[str, int]:
    try:
        return {user: row["n"] for user, row in rows(url).items()}
    except sqlite3.OperationalError:  # no table yet
        return {}


@pytest.mark.parametrize(
    ("trigger", "ending"),
    [
        ('ends_when = { event_type = "checkout" }\n', {"event_type": "checkout"}),
        ("max_events = 4\n", {"event_type": "view"}),
        ('idle = "1s"\n', None),
    ],
)
def test_trigger_ends_the_session_while_running(
    redis_url: str,
    namespace: str,
    client: Any,
    tmp_path: Path,
    helpers: Any,
    trigger: str,
    ending: Any,
) -> None:
    url = f"sqlite:///{tmp_path}/t.db"
    cfg = tmp_path / "t.toml"
    cfg.write_text(route_toml(url, trigger, fields='fields.n = { merge = "count" }\n'))
    proc = helpers.start_worker(redis_url, namespace, cfg)
    assert proc.stdin is not None
    try:
        # "waits" gets 3 events and no ending; "ends" gets 3 then the ending one.
        if ending is None:
            evs = [{"user": "ends", "event_type": "view"}] * 4
        else:
            evs = [{"user": "waits", "event_type": "view"}] * 3
            evs += [{"user": "ends", "event_type": "view"}] * 3 + [{"user": "ends", **ending}]
        proc.stdin.write(lines(evs))
        proc.stdin.flush()
        # The worker's start and first read take what the machine's load makes them
        # (seconds at load 8); the trigger is timed from there, not from the spawn.
        helpers.wait_for(
            lambda: sum(helpers.events_read(client, namespace).values()) == len(evs),
            timeout_s=40,
            what="the worker to start and read the events",
        )
        helpers.wait_for(lambda: _counts(url).get("ends") == 4, what=f"{trigger.strip()} to end")
        assert proc.poll() is None  # still running: the trigger wrote it, not the end of input
        assert _counts(url) == {"ends": 4}  # "waits" merged its events before, and waits
        if "max_events" in trigger:
            # the next event of "ends" starts a new session, that ends at 4 more
            proc.stdin.write(lines([{"user": "ends", "event_type": "view"}] * 4))
            proc.stdin.flush()
            helpers.wait_for(lambda: _counts(url).get("ends") == 8, what="second session")
    finally:
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    final = {"ends": 8 if "max_events" in trigger else 4}
    assert _counts(url) == (final if ending is None else {**final, "waits": 3})


# -- config errors and the example ------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "key", "reason"),
    [
        (
            'fields.x = { value = "{a}", merge = "avg" }\n',
            "routes[0].fields.x.merge",
            "unknown strategy 'avg'",
        ),
        (
            'fields.t = { value = "{a}", merge = "top", n = 2 }\n',
            "routes[0].fields.t.score",
            "missing",
        ),
        (
            'fields.s = { value = "n={a}", merge = "sum" }\n',
            "routes[0].fields.s.value",
            "yields text",
        ),
    ],
)
def test_config_errors_exit_2_naming_the_key(
    tmp_path: Path, extra: str, key: str, reason: str
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(route_toml("sqlite:///x.db", fields=extra))
    for command in ("check", "run"):
        r = subprocess.run([*PHONON, command, "-c", str(cfg)], capture_output=True, timeout=60)
        err = r.stderr.decode()
        assert r.returncode == 2, err
        assert f"{cfg}: {key}: " in err and reason in err
        assert "Traceback" not in err


def test_sessions_example_runs(redis_url: str, namespace: str, tmp_path: Path) -> None:
    example = ROOT / "configs" / "sessions.toml"
    check = subprocess.run([*PHONON, "check", "-c", str(example)], capture_output=True, timeout=60)
    assert (check.returncode, check.stdout) == (0, f"{example}: ok, 2 route(s)\n".encode())
    generated = subprocess.run(
        [sys.executable, str(ROOT / "configs" / "generate_sessions.py"), "3000", "80", "4"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    db = tmp_path / "sessions.db"
    cfg = tmp_path / "sessions.toml"
    cfg.write_text(example.read_text().replace("sqlite:///sessions.db", f"sqlite:///{db}"))
    result = subprocess.run(
        phonon(
            "run", "-c", str(cfg), "--max-entries", "20", redis_url=redis_url, namespace=namespace
        ),
        input=generated,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert b"events read 3000, routed 3000, unmatched 0, dead-lettered 0" in result.stderr
    evs = [orjson.loads(line) for line in generated.splitlines()]
    url = f"sqlite:///{db}"
    sessions, products = rows(url, "sessions"), rows(url, "products")
    by_session: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in evs:
        by_session[e["session_id"]].append(e)
    assert set(sessions) == set(by_session)
    for sid, es in by_session.items():
        timed = sorted((e["ts"], canonical(e["page"])) for e in es)
        row = sessions[sid]
        assert (row["user_id"], row["events"], row["started"], row["last_seen"]) == (
            es[0]["user_id"],
            len(es),
            min(e["ts"] for e in es),
            max(e["ts"] for e in es),
        )
        assert (row["landing"], row["exit_page"]) == (
            orjson.loads(timed[0][1]),
            orjson.loads(timed[-1][1]),
        )
        assert row["pages"] == sorted({e["page"] for e in es}, key=canonical)
        assert row["path"] == [orjson.loads(t) for _, t in timed[-10:]]
    checkouts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in evs:
        if e["event_type"] == "checkout":
            checkouts[e["product"]].append(e)
    assert set(products) == set(checkouts) and checkouts
    for product, es in checkouts.items():
        row = products[product]
        amounts = [e["amount"] for e in es]
        ranked = sorted((-e["amount"], canonical(e["session_id"])) for e in es)[:3]
        buyers = len({e["user_id"] for e in es})
        assert (row["revenue"], row["orders"], row["average"], row["cheapest"]) == (
            sum(amounts),
            len(amounts),
            sum(amounts) / len(amounts),
            min(amounts),
        )
        assert abs(row["buyers"] - buyers) <= max(1, buyers // 20)
        assert row["biggest"] == [[-s, orjson.loads(t)] for s, t in ranked]


def test_orphan_partial_is_written_without_its_route(make_process: Any, db_url: str) -> None:
    """A partial left in Redis is rebuilt from its recipe alone (no route, no fields)
    and written by any worker that knows the class: the slot names say how."""
    from phonon_cli.core.recovery import claim_orphans
    from phonon_cli.sinks.sql import Aggregate

    route = Config.from_mapping(
        {"routes": [{"update": "aggregates:Recorder", "id": "{user}", "fields": FIELDS}]}
    ).routes[0]
    evs = events(40, 1, seed=3)
    doc: dict[str, Any] = {}
    for e in evs:
        for slot, v in event_slots(route.declared, route.build(e)[2]).items():
            doc[slot] = merge_slot(slot, doc[slot], v) if slot in doc else v
    left = make_process()
    fields = [f.field for f in route.fields]
    Aggregate(left, "u0", db_url, "sessions", {"user": "u0"}, doc, fields=fields).cache()
    survivor = make_process()
    survivor.register(Aggregate)
    assert claim_orphans(survivor, ["sessions:u0"]) == (["sessions:u0"], [])
    assert_matches(rows(db_url), evs)


def test_aggregate_lines_sink_prints_values(redis_url: str, namespace: str, tmp_path: Path) -> None:
    cfg = tmp_path / "lines.toml"
    cfg.write_text(route_toml("-").replace("sinks.sql:Aggregate", "sinks.jsonl:AggregateLines"))
    evs = events(300, 6, seed=2)
    result = subprocess.run(
        phonon("run", "-c", str(cfg), redis_url=redis_url, namespace=namespace),
        input=lines(evs),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()
    printed = [orjson.loads(line) for line in result.stdout.splitlines()]
    want = expected(evs)
    assert sorted(p["id"] for p in printed) == sorted(want)
    for p in printed:
        assert (p["collection"], p["spec"]) == ("sessions", {"user": p["id"]})
        w = dict(want[p["id"]])
        assert abs(p["values"].pop("visitors") - w.pop("visitors")) <= 1
        assert p["values"] == w


def test_status_adds_up_the_nulls_each_worker_skipped(make_process: Any, namespace: str) -> None:
    from phonon_cli.ops.status import Status, render

    for published in ({"routes[0]": 5, "routes[1]": 0}, {"routes[0]": 2, "routes[1]": 7}):
        p = make_process(start_heartbeat=False)
        p.stats["nulls_skipped"] = orjson.dumps(published).decode()
        p.heartbeat()
    snap = Status(p.client, namespace, "x").snapshot(20)
    assert snap.totals.nulls_skipped == {"routes[0]": 7, "routes[1]": 7}
    assert "nulls skipped: routes[0] 7, routes[1] 7\n" in render(snap)


def test_summary_json_counts_skipped_nulls_per_route(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "agg.toml"
    cfg.write_text(route_toml(f"sqlite:///{tmp_path}/s.db", fields=FIELDS_SUM))
    evs = [{"user": "a", "amount": None}, {"user": "a", "amount": 2}, {"user": "b", "amount": None}]
    summary = tmp_path / "summary.json"
    result = subprocess.run(
        phonon(
            "run",
            "-c",
            str(cfg),
            "--summary-json",
            str(summary),
            redis_url=redis_url,
            namespace=namespace,
        ),
        input=lines(evs),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert orjson.loads(summary.read_bytes())["nulls_skipped"] == {"routes[0]": 2}
    assert {u: r["total"] for u, r in rows(f"sqlite:///{tmp_path}/s.db").items()} == {
        "a": 2,
        "b": None,
    }


FIELDS_SUM = 'fields.total = { value = "{amount}", merge = "sum" }\n'
