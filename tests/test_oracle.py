"""An independent oracle for declarative fields: DuckDB computes the same aggregates
with SQL from the same JSON lines, while real ``phonon run`` workers with small
caches aggregate them into SQLite (and PostgreSQL).

The events are what real data looks like: nulls in every field a strategy reads,
a nested field that is sometimes missing, unicode keys and values, large and
negative numbers, floats. Every key and every field must match exactly;
``distinct_count`` within its documented error (docs/aggregation.md). DuckDB
follows SQL's null rules, which phonon documents as its own: this test is what
holds phonon to them.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import CI

duckdb = pytest.importorskip("duckdb", reason="duckdb is a dev dependency (pip install .[dev])")

EVENTS = 12_000 if CI else 3_000
WORKERS = 3
CARRIERS = ["AA", "Ünïted", "日本航空", "B6 ✈", "DL"]
ORIGINS = ["JFK", "SÃO", "LHR", "北京"]
TAILS = [f"N{n}{c}" for n in range(40) for c in "AB"] + ["ÉÈ-1", "尾翼-7"]

FIELDS = """
fields.n = { merge = "count" }
fields.delay_sum = { value = "{delay}", merge = "sum" }
fields.delay_min = { value = "{delay}", merge = "min" }
fields.delay_max = { value = "{delay}", merge = "max" }
fields.dist_sum = { value = "{dist}", merge = "sum" }
fields.dist_mean = { value = "{dist}", merge = "mean" }
fields.first_gate = { value = "{meta.gate}", merge = "first", by = "{ts}", optional = true }
fields.last_gate = { value = "{meta.gate}", merge = "last", by = "{ts}", optional = true }
fields.recent = { value = "{tail}", merge = "list", n = 3, by = "{ts}" }
fields.tails = { value = "{tail}", merge = "set" }
fields.latest = { value = "{tail}", merge = "top", n = 3, score = "{ts}" }
fields.tail_count = { value = "{tail}", merge = "distinct_count" }
"""

ORACLE = """
SELECT carrier, origin,
  count(*) AS n,
  sum(delay) AS delay_sum,
  min(delay) AS delay_min,
  max(delay) AS delay_max,
  sum(dist) AS dist_sum,
  avg(dist) AS dist_mean,
  first(meta.gate ORDER BY ts) AS first_gate,
  last(meta.gate ORDER BY ts) AS last_gate,
  list(tail ORDER BY ts DESC)[1:3] AS recent_desc,
  list(DISTINCT tail) FILTER (WHERE tail IS NOT NULL) AS tails,
  list([ts::VARCHAR, tail] ORDER BY ts DESC) FILTER (WHERE tail IS NOT NULL) AS latest,
  count(DISTINCT tail) AS tail_count
FROM read_json(?, format = 'newline_delimited', columns = {
  carrier: 'VARCHAR', origin: 'VARCHAR', delay: 'BIGINT', dist: 'DOUBLE',
  tail: 'VARCHAR', meta: 'STRUCT(gate VARCHAR)', ts: 'BIGINT'
})
GROUP BY carrier, origin
"""
"""SQL's rules, as DuckDB applies them: ``list`` keeps nulls, ``first``/``last``
with ORDER BY keep a null value, the others skip nulls."""


def generate(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)

    def maybe(value: Any, p_null: float = 0.12) -> Any:
        return None if rng.random() < p_null else value

    events = []
    for i in range(n):
        e: dict[str, Any] = {
            "carrier": rng.choice(CARRIERS),
            "origin": rng.choice(ORIGINS),
            # large and negative: sums stay exact in int64 whatever the order
            "delay": maybe(rng.choice([rng.randint(-90, 600), rng.randint(-(10**12), 10**12)])),
            # multiples of 1/4: every float sum is exact, so any order gives the same
            "dist": maybe(rng.randint(-4000, 4_000_000) / 4),
            "tail": maybe(rng.choice(TAILS)),
            "ts": 1_700_000_000_000 + i * 7 + rng.randrange(7),  # unique, increasing
        }
        kind = rng.random()
        if kind < 0.7:
            e["meta"] = {"gate": maybe(rng.choice(["A1", "B22", "Ç3", "门4"]))}
        elif kind < 0.85:
            e["meta"] = {}  # the nested field missing: optional, so a null
        if rng.random() < 0.05:
            del e["dist"]  # dist is not optional: a dead letter
        events.append(e)
    rng.shuffle(events)  # arrival order is not time order
    return events


def oracle(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """What SQL says each key's fields are (DuckDB on the same lines)."""
    conn = duckdb.connect()
    cur = conn.execute(ORACLE, [str(path)])
    names = [d[0] for d in cur.description]
    out = {}
    for row in cur.fetchall():
        r = dict(zip(names, row))
        latest = r.pop("latest") or []
        r["latest"] = [[int(ts), tail] for ts, tail in latest[:3]] or None
        recent = r.pop("recent_desc")
        r["recent"] = list(reversed(recent)) if recent else None
        r["tails"] = sorted(r["tails"], key=canonical) if r["tails"] else None
        r["tail_count"] = r["tail_count"] or None  # no value: phonon's column is NULL
        out[(r.pop("carrier"), r.pop("origin"))] = r
    return out


def canonical(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def run_workers(cfg: Path, lines: list[bytes], redis_url: str, namespace: str) -> str:
    """``WORKERS`` concurrent ``phonon run`` processes with small caches, each given a
    share of the lines; their stderr, every one checked to exit 0."""
    procs = []
    for w in range(WORKERS):
        share = cfg.parent / f"share{w}.jsonl"
        share.write_bytes(b"".join(lines[w::WORKERS]))
        with share.open("rb") as stdin:
            cmd = [sys.executable, "-m", "phonon_cli", "--redis-url", redis_url]
            cmd += ["--namespace", namespace, "run", "-c", str(cfg), "--max-entries", "4"]
            procs.append(subprocess.Popen(cmd, stdin=stdin, stderr=subprocess.PIPE))
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err.decode()
        errs.append(err.decode())
    return "\n".join(errs)


def table(url: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Every row of the table, JSON columns decoded, by (carrier, origin)."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///") :]) as conn:
            cur = conn.execute('SELECT * FROM "flights"')
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r)) for r in cur.fetchall()]
        for r in rows:
            for name in ("recent", "tails", "latest"):
                if r.get(name) is not None:
                    r[name] = orjson.loads(r[name])
    else:
        import psycopg

        with psycopg.connect(url) as conn:
            cur = conn.execute('SELECT * FROM "flights"')
            names = [d.name for d in cur.description or ()]
            rows = [dict(zip(names, r)) for r in cur.fetchall()]
    return {(r["carrier"], r["origin"]): r for r in rows}


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/flights.db"
    return str(request.getfixturevalue("postgres_url"))


@pytest.mark.slow
def test_every_key_and_field_matches_duckdb(
    redis_url: str, namespace: str, db_url: str, tmp_path: Path
) -> None:
    events = generate(EVENTS, seed=14)
    lines = [orjson.dumps(e) + b"\n" for e in events]
    kept = tmp_path / "kept.jsonl"  # what SQL aggregates: the events phonon must keep
    kept.write_bytes(b"".join(line for e, line in zip(events, lines) if "dist" in e))
    cfg = tmp_path / "flights.toml"
    cfg.write_text(
        "[[routes]]\n"
        'update = "phonon_cli.sinks.sql:Aggregate"\n'
        'id = "{carrier}|{origin}"\n'
        'collection = "flights"\n'
        f"database = {orjson.dumps(db_url).decode()}\n"
        'spec = { carrier = "{carrier}", origin = "{origin}" }\n' + FIELDS
    )
    err = run_workers(cfg, lines, redis_url, namespace)
    want, got = oracle(kept), table(db_url)
    dead = sum("dist" not in e for e in events)
    assert sum(int(x) for x in _figures(err, "dead-lettered")) == dead
    assert set(got) == set(want)
    for key, w in want.items():
        row = got[key]
        exact = {name: row.get(name) for name in w if name != "tail_count"}
        assert exact == {name: v for name, v in w.items() if name != "tail_count"}, key
        # distinct_count: within its documented error (about 2 %; a few values exact)
        count, true = row.get("tail_count"), w["tail_count"]
        assert (count is None) == (true is None), key
        if true is not None:
            assert abs(count - true) <= max(1, round(0.08 * true)), (key, count, true)
    # Nulls were there to skip, and were counted: every worker's summary says so.
    assert sum(int(x) for x in _figures(err, "nulls skipped: routes[0]")) > len(events) // 10


def _figures(err: str, label: str) -> list[str]:
    import re

    return re.findall(re.escape(label) + r" (\d+)", err)
