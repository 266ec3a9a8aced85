"""``make bench``: phonon run beside a bare-Python floor on the same input, one run.

The floor is the least any tool must do with these events: orjson parse, a dict
sum per key, one executemany UPSERT into SQLite. phonon does that plus routing,
the LRU cache and Redis coordination (embedded server, batched scripts).

Usage: python bench/bench.py [EVENTS_HIGH] [EVENTS_LOW] [EVENTS_FIELDS] [REPEAT]

Rows: high locality (10k keys), low locality (every event a new key), high
locality with ``--workers 2``, Bytewax's fold_final on the same input when
installed (``pip install .[bench]``), and memory per cached key. Then the same
high-locality events through a route with ``fields`` using every strategy,
beside the same events through the ``doc`` route: fields ÷ doc (issue 14 asks
for at least 0.5).
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
from dataclasses import dataclass
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
    db.unlink(missing_ok=True)
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


@dataclass
class Ran:
    wall_s: float
    loop_s: float
    rss_kib: int
    summary: str


def phonon(
    path: Path,
    db: Path,
    home: Path,
    max_entries: int,
    workers: int = 1,
    repeat: int = 1,
    config: str = CONFIG,
) -> Ran:
    """``phonon run`` on ``path``, the median of ``repeat`` runs (fresh database each)."""
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "bench.toml"
    cfg.write_text(config.format(max_entries=max_entries, db=db))
    env = {k: v for k, v in os.environ.items() if k not in ("PHONON_REDIS_URL",)}
    env["PHONON_HOME"] = str(home)
    from phonon_cli.store.connection import EmbeddedServer

    # Start the embedded server first, so its start-up is not counted.
    EmbeddedServer(home).ensure_running()
    runs = []
    try:
        for _ in range(repeat):
            db.unlink(missing_ok=True)
            runs.append(_run_once(path, cfg, env, workers))
    finally:
        EmbeddedServer(home).stop()
    runs.sort(key=lambda r: r.wall_s)
    return runs[len(runs) // 2]


def _run_once(path: Path, cfg: Path, env: dict[str, str], workers: int) -> Ran:
    command = [sys.executable, "-m", "phonon_cli", "run", "-c", str(cfg), "--workers", str(workers)]
    started = time.perf_counter()
    with open(path, "rb") as f, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, stdin=f, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"phonon run failed:\n{text}")
    m = re.search(r"([\d.]+)s, ([\d,]+) events/s", text)
    loop = float(m.group(1)) if m else wall
    return Ran(wall, loop, usage.ru_maxrss, text.strip().splitlines()[-1])


def bytewax(path: Path, repeat: int = 1) -> float | None:
    """The same aggregation as a Bytewax dataflow (fold_final, one worker), if installed:
    seconds, median of ``repeat``; None without bytewax (``pip install .[bench]``)."""
    try:
        import bytewax.operators as op
        from bytewax.connectors.files import FileSource
        from bytewax.dataflow import Dataflow
        from bytewax.testing import TestingSink, run_main
    except ImportError:
        return None

    def once() -> float:
        out: list[tuple[str, list[int]]] = []
        flow = Dataflow("bench")
        events = op.map("parse", op.input("in", flow, FileSource(path)), orjson.loads)
        keyed = op.key_on("key", events, lambda e: f"{e['parent_post_id']}.{e['target_post_id']}")

        def add(acc: list[int], e: dict) -> list[int]:
            acc[0 if e["event_type"] == "clicks" else 1] += 1
            return acc

        op.output("out", op.fold_final("sum", keyed, lambda: [0, 0], add), TestingSink(out))
        started = time.perf_counter()
        run_main(flow)
        return time.perf_counter() - started

    return sorted(once() for _ in range(repeat))[repeat // 2]


def check_equal(a: Path, b: Path, what: str) -> None:
    q = "SELECT parent_post_id, target_post_id, clicks, impressions FROM widgets ORDER BY 1, 2"
    with sqlite3.connect(a) as x, sqlite3.connect(b) as y:
        want, got = list(x.execute(q)), list(y.execute(q))
    if want != got:
        raise SystemExit(
            f"{what}: phonon and the floor disagree on the totals "
            f"({len(got)} rows, {sum(r[2] + r[3] for r in got)} events; "
            f"the floor: {len(want)} rows, {sum(r[2] + r[3] for r in want)} events)"
        )


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main() -> None:
    high = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    low = int(sys.argv[2]) if len(sys.argv) > 2 else 200_000
    fields_events = int(sys.argv[3]) if len(sys.argv) > 3 else 200_000
    repeat = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    work = Path(tempfile.mkdtemp(prefix="phonon-bench-"))
    # Per row, per round: (floor ev/s, ev/s, loop ev/s). A shared machine's load moves
    # between runs, so each round runs every row once, each beside its own floor, and
    # the ratios are taken per round before their median.
    runs: dict[str, list[tuple[float, float, float]]] = {}
    notes: dict[str, str] = {}
    sizes = {"high": (high, 10_000), "low": (low, None)}
    try:
        for tag, (events, keys) in sizes.items():
            generate(work / f"{tag}.jsonl", events, keys)
        for _ in range(repeat):
            for tag, (events, _keys) in sizes.items():
                data = work / f"{tag}.jsonl"
                floor_db = work / f"floor-{tag}.db"
                f = events / floor(data, floor_db)
                for workers in (1, 2) if tag == "high" else (1,):
                    name = f"{tag} locality" + (f", {workers} workers" if workers > 1 else "")
                    db = work / f"phonon-{tag}-{workers}.db"
                    ran = phonon(data, db, work / f"home-{tag}-{workers}", 10_000, workers)
                    check_equal(floor_db, db, name)
                    runs.setdefault(name, []).append((f, events / ran.wall_s, events / ran.loop_s))
                    notes[name] = ran.summary
                peer = bytewax(data)
                if peer is not None:
                    runs.setdefault(f"  bytewax ({tag})", []).append(
                        (f, events / peer, events / peer)
                    )
        # Memory per cached key: the low-locality input with every key kept in the
        # cache to the end, beside the same input through a cache of 1,000 keys.
        data = work / "low.jsonl"
        big = phonon(data, work / "mem-big.db", work / "home-mem-big", low + 1)
        small = phonon(data, work / "mem-small.db", work / "home-mem-small", 1_000)
        per_key = (big.rss_kib - small.rss_kib) * 1024 / (low - 1_000)
        fields_row = fields_vs_doc(work, fields_events)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{'stream':<22} {'events':>9} {'floor ev/s':>11} {'ev/s':>10} "
        f"{'ratio':>6} {'loop ev/s':>10} {'ratio':>6}"
    )
    for name, rounds in runs.items():
        events = sizes["low" if "low" in name else "high"][0]
        f = median([r[0] for r in rounds])
        w, loop = median([r[1] for r in rounds]), median([r[2] for r in rounds])
        ratio = median([r[1] / r[0] for r in rounds])
        loop_ratio = median([r[2] / r[0] for r in rounds])
        print(
            f"{name:<22} {events:>9,} {f:>11,.0f} {w:>10,.0f} {ratio:>6.2f} "
            + (f"{loop:>10,.0f} {loop_ratio:>6.2f}" if "bytewax" not in name else "")
        )
    one, two = runs.get("high locality"), runs.get("high locality, 2 workers")
    if one and two:
        scale = median([b[1] / a[1] for a, b in zip(one, two)])
        print(f"2 workers / 1 worker (wall, same round): {scale:.2f}")
    print(f"memory per cached key: {per_key:,.0f} bytes (peak RSS, {low:,} keys cached vs 1,000)")
    print(f"median of {repeat} round(s); each ratio is taken against the floor of its round.")
    print("ev/s: wall time of `phonon run` (process start to exit, totals checked equal to")
    print("the floor's); loop ev/s: from its own summary.")
    for name, summary in notes.items():
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
            ran = phonon(data, db, work / f"home-{name}-f{run}", 10_000, config=config)
            best[name] = max(best[name], events / ran.loop_s)
            if name == "fields":
                summary = ran.summary
                with sqlite3.connect(db) as conn:
                    total = conn.execute("SELECT sum(events) FROM widgets").fetchone()[0]
                if total != events:
                    raise SystemExit(f"the fields route counted {total} events of {events}")
    return events, best["doc"], best["fields"], summary


if __name__ == "__main__":
    main()
