"""``make bench``: phonon run beside a bare-Python floor on the same input, one run.

The floor is the least any tool must do with these events: orjson parse, a dict
sum per key, one executemany UPSERT into SQLite. phonon does that plus routing,
the LRU cache and Redis coordination (embedded server, batched scripts).

A third row runs the same high-locality events through a route with ``fields``
using every strategy, beside the same events through the ``doc`` route, and
prints fields ÷ doc (issue 14 asks for at least 0.5).

Usage: python bench/bench.py [EVENTS_HIGH] [EVENTS_LOW] [EVENTS_FIELDS]
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

CONFIG = """
[cache]
max_entries = {max_entries}

[[routes]]
when = {{ event_type = ["clicks", "impressions"] }}
update = "phonon_cli.sinks.sql:Counter"
id = "{{parent_post_id}}.{{target_post_id}}"
collection = "widgets"
database = "sqlite:///{db}"
spec = {{ parent_post_id = "{{parent_post_id}}", target_post_id = "{{target_post_id}}" }}
doc = {{ "{{event_type}}" = 1 }}
"""

FIELDS_CONFIG = """
[cache]
max_entries = {max_entries}

[[routes]]
when = {{ event_type = ["clicks", "impressions"] }}
update = "phonon_cli.sinks.sql:Aggregate"
id = "{{parent_post_id}}.{{target_post_id}}"
collection = "widgets"
database = "sqlite:///{db}"
spec = {{ parent_post_id = "{{parent_post_id}}", target_post_id = "{{target_post_id}}" }}
fields.events = {{ merge = "count" }}
fields.ts_sum = {{ value = "{{ts}}", merge = "sum" }}
fields.ts_min = {{ value = "{{ts}}", merge = "min" }}
fields.ts_max = {{ value = "{{ts}}", merge = "max" }}
fields.ts_mean = {{ value = "{{ts}}", merge = "mean" }}
fields.first_type = {{ value = "{{event_type}}", merge = "first", by = "{{ts}}" }}
fields.last_type = {{ value = "{{event_type}}", merge = "last", by = "{{ts}}" }}
fields.types = {{ value = "{{event_type}}", merge = "set" }}
fields.recent = {{ value = "{{event_type}}", merge = "list", n = 5, by = "{{ts}}" }}
fields.latest = {{ value = "{{ts}}", merge = "top", n = 3, score = "{{ts}}" }}
fields.distinct_ts = {{ value = "{{ts}}", merge = "distinct_count" }}
"""
"""Every strategy, on the widget events."""


def generate(path: Path, events: int, keys: int | None) -> None:
    """keys None: every event a new key."""
    rng = random.Random(42)
    with open(path, "w") as f:
        for i in range(events):
            k = i if keys is None else rng.randrange(keys)
            kind = "clicks" if rng.random() < 0.1 else "impressions"
            f.write(
                f'{{"parent_post_id": {k // 100}, "target_post_id": {k}, '
                f'"event_type": "{kind}", "ts": {1_700_000_000 + i}}}\n'
            )


def floor(path: Path, db: Path) -> float:
    started = time.perf_counter()
    sums: dict[tuple[int, int], list[int]] = {}
    loads = orjson.loads
    with open(path, "rb") as f:
        for line in f:
            e = loads(line)
            key = (e["parent_post_id"], e["target_post_id"])
            s = sums.get(key)
            if s is None:
                s = sums[key] = [0, 0]
            s[0 if e["event_type"] == "clicks" else 1] += 1
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS widgets (parent_post_id INTEGER, "
            "target_post_id INTEGER, clicks INTEGER DEFAULT 0, impressions INTEGER "
            "DEFAULT 0, PRIMARY KEY (parent_post_id, target_post_id))"
        )
        conn.executemany(
            "INSERT INTO widgets VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
            "clicks = clicks + excluded.clicks, impressions = impressions + excluded.impressions",
            [(p, t, c, i) for (p, t), (c, i) in sums.items()],
        )
    return time.perf_counter() - started


def phonon(
    path: Path, db: Path, home: Path, max_entries: int, config: str = CONFIG
) -> tuple[float, float, str]:
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "bench.toml"
    cfg.write_text(config.format(max_entries=max_entries, db=db))
    env = {k: v for k, v in os.environ.items() if k not in ("PHONON_REDIS_URL",)}
    env["PHONON_HOME"] = str(home)
    # Start the embedded server first, so its start-up is not counted.
    subprocess.run(
        [sys.executable, "-m", "phonon_cli", "check", "-c", str(cfg)],
        env=env,
        check=True,
        capture_output=True,
    )
    from phonon_cli.store.connection import EmbeddedServer

    EmbeddedServer(home).ensure_running()
    started = time.perf_counter()
    with open(path, "rb") as f:
        r = subprocess.run(
            [sys.executable, "-m", "phonon_cli", "run", "-c", str(cfg)],
            stdin=f,
            capture_output=True,
            env=env,
        )
    wall = time.perf_counter() - started
    EmbeddedServer(home).stop()
    err = r.stderr.decode()
    if r.returncode != 0:
        raise SystemExit(f"phonon run failed:\n{err}")
    m = re.search(r"([\d.]+)s, ([\d,]+) events/s", err)
    loop = float(m.group(1)) if m else wall
    return wall, loop, err.strip().splitlines()[-1]


def check_equal(a: Path, b: Path) -> None:
    q = "SELECT parent_post_id, target_post_id, clicks, impressions FROM widgets ORDER BY 1, 2"
    with sqlite3.connect(a) as x, sqlite3.connect(b) as y:
        if list(x.execute(q)) != list(y.execute(q)):
            raise SystemExit("phonon and the floor disagree on the totals")


def main() -> None:
    high = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    low = int(sys.argv[2]) if len(sys.argv) > 2 else 200_000
    fields_events = int(sys.argv[3]) if len(sys.argv) > 3 else 200_000
    work = Path(tempfile.mkdtemp(prefix="phonon-bench-"))
    rows = []
    try:
        for name, events, keys, max_entries in (
            ("high locality", high, 10_000, 10_000),
            ("low locality", low, None, 10_000),
        ):
            data = work / f"{name.split()[0]}.jsonl"
            generate(data, events, keys)
            floor_s = floor(data, work / f"floor-{name.split()[0]}.db")
            db = work / f"phonon-{name.split()[0]}.db"
            wall_s, loop_s, summary = phonon(
                data, db, work / f"home-{name.split()[0]}", max_entries
            )
            check_equal(work / f"floor-{name.split()[0]}.db", db)
            rows.append(
                (name, events, keys, events / floor_s, events / wall_s, events / loop_s, summary)
            )
        fields_row = fields_vs_doc(work, fields_events)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{'stream':<14} {'events':>9} {'keys':>9} {'floor ev/s':>11} {'phonon ev/s':>12} "
        f"{'ratio':>6} {'loop ev/s':>10} {'ratio':>6}"
    )
    for name, events, keys, f, w, loop, _ in rows:
        print(
            f"{name:<14} {events:>9,} {keys or events:>9,} {f:>11,.0f} {w:>12,.0f} "
            f"{w / f:>6.2f} {loop:>10,.0f} {loop / f:>6.2f}"
        )
    print("phonon ev/s: wall time of `phonon run` (process start to exit, totals checked equal);")
    print("loop ev/s: from its own summary (excludes interpreter start-up).")
    for name, *_, summary in rows:
        print(f"  {name}: {summary}")
    events, doc_loop, fields_loop, summary = fields_row
    print(
        f"\nfields route (every strategy) vs doc route, {events:,} high-locality events, "
        f"10,000 keys, best of 2 runs each:\n  doc {doc_loop:,.0f} ev/s, "
        f"fields {fields_loop:,.0f} ev/s (loop), "
        f"fields/doc {fields_loop / doc_loop:.2f}\n  fields: {summary}"
    )


def fields_vs_doc(work: Path, events: int, runs: int = 2) -> tuple[int, float, float, str]:
    """The same events through the doc route and through a fields route using every
    strategy, ``runs`` times each in turn (the machine's load moves: the best of
    each is compared): loop events/s of each, and a fields run's summary."""
    data = work / "fields.jsonl"
    generate(data, events, 10_000)
    best = {"doc": 0.0, "fields": 0.0}
    summary = ""
    for run in range(runs):
        for name, config in (("doc", CONFIG), ("fields", FIELDS_CONFIG)):
            db = work / f"{name}-f{run}.db"
            _, loop, summary_ = phonon(data, db, work / f"home-{name}-f{run}", 10_000, config)
            best[name] = max(best[name], events / loop)
            if name == "fields":
                summary = summary_
                with sqlite3.connect(db) as conn:
                    total = conn.execute("SELECT sum(events) FROM widgets").fetchone()[0]
                if total != events:
                    raise SystemExit(f"the fields route counted {total} events of {events}")
    return events, best["doc"], best["fields"], summary


if __name__ == "__main__":
    main()
