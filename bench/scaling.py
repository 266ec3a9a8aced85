"""Throughput of ``phonon run`` on one Redis and on 1-, 3- and 6-master Redis Clusters.

Same input and config for every store: a low-locality stream (many keys, a small
cache, so nearly every event costs Redis work: the case where Redis is the
limit). Each store is a fresh redis-server (or cluster) on loopback ports, with
no persistence, started before the clock and stopped after. Totals are checked
against the input after every run.

Usage: python bench/scaling.py [EVENTS] [KEYS] [WORKERS] [MAX_ENTRIES]
Also prints the round trips one batched release of 1,000 keys makes per store.
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
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "helpers"))

import rediscluster  # noqa: E402

CONFIG = """
[cache]
max_entries = {max_entries}

[[routes]]
update = "phonon_cli.sinks.sql:Counter"
id = "{{k}}"
collection = "t"
database = "sqlite:///{db}"
spec = {{ k = "{{k}}" }}
doc = {{ n = 1 }}
"""


def generate(path: Path, events: int, keys: int) -> Counter[str]:
    rng = random.Random(7)
    expected: Counter[str] = Counter()
    with open(path, "w") as f:
        for _ in range(events):
            k = f"k{rng.randrange(keys)}"
            expected[k] += 1
            f.write(f'{{"k": "{k}"}}\n')
    return expected


def run(url: str, cluster: bool, data: Path, work: Path, workers: int, max_entries: int) -> dict:
    db = work / "out.db"
    db.unlink(missing_ok=True)
    cfg = work / "c.toml"
    cfg.write_text(CONFIG.format(max_entries=max_entries, db=db))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHONON_")}
    cmd = [sys.executable, "-m", "phonon_cli", "--redis-url", url, "--namespace", "bench"]
    cmd += ["--redis-cluster"] if cluster else []
    cmd += ["run", "-c", str(cfg), "--workers", str(workers)]
    started = time.perf_counter()
    with open(data, "rb") as f:
        r = subprocess.run(cmd, stdin=f, capture_output=True, env=env)
    wall = time.perf_counter() - started
    err = r.stderr.decode()
    if r.returncode != 0:
        raise SystemExit(f"phonon run failed:\n{err}")
    executed = int(re.search(r"keys executed ([\d,]+)", err).group(1).replace(",", ""))  # type: ignore[union-attr]
    cached = int(re.search(r"cached ([\d,]+)", err).group(1).replace(",", ""))  # type: ignore[union-attr]
    with sqlite3.connect(db) as conn:
        got = dict(conn.execute("SELECT k, n FROM t").fetchall())
    return {"wall": wall, "keys": executed + cached, "totals": got, "summary": err.strip()}


def round_trips(url: str, cluster: bool) -> int:
    """Requests sent for one release_many of 1,000 keys (a pipeline is one per node)."""
    import redis.connection

    from phonon_cli.core.process import Process
    from phonon_cli.core.reference import Release, acquire_many, release_many

    p = Process(url, namespace="bench-rt", cluster=cluster, start_heartbeat=False)
    try:
        resources = [f"r{i}" for i in range(1000)]
        acquire_many(p, resources)
        sent = [0]
        send = redis.connection.Connection.send_packed_command

        def counting(self, command, check_health=True):  # type: ignore[no-untyped-def]
            sent[0] += 1
            return send(self, command, check_health)

        redis.connection.Connection.send_packed_command = counting  # type: ignore[method-assign]
        try:
            release_many(p, [Release(r, "end", "sums", "", "n\t1\n") for r in resources])
        finally:
            redis.connection.Connection.send_packed_command = send  # type: ignore[method-assign]
        return sent[0]
    finally:
        p.stop()


def main() -> None:
    events = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    keys = int(sys.argv[2]) if len(sys.argv) > 2 else 50_000
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    max_entries = int(sys.argv[4]) if len(sys.argv) > 4 else 1_000
    work = Path(tempfile.mkdtemp(prefix="phonon-scaling-"))
    rows = []
    try:
        data = work / "events.jsonl"
        expected = generate(data, events, keys)
        for name, masters in (("1 redis", 0), ("1 master", 1), ("3 masters", 3), ("6 masters", 6)):
            if masters == 0:
                store = rediscluster.plain_server(work / "plain")
                url, cluster, stop = store.url, False, store.kill
            else:
                c = rediscluster.Cluster(work / f"c{masters}", masters=masters).start()
                url, cluster, stop = c.url, True, c.stop
            try:
                result = run(url, cluster, data, work, workers, max_entries)
                trips = round_trips(url, cluster)
            finally:
                stop()
            if result["totals"] != dict(expected):
                raise SystemExit(f"{name}: totals differ from the input")
            rows.append((name, events / result["wall"], result["keys"] / result["wall"], trips))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{events:,} events, {keys:,} keys, --workers {workers}, --max-entries {max_entries}")
    print(f"{'store':<10} {'events/s':>9} {'keys/s':>8} {'requests per 1,000-key release':>31}")
    for name, ev, ks, trips in rows:
        print(f"{name:<10} {ev:>9,.0f} {ks:>8,.0f} {trips:>31}")


if __name__ == "__main__":
    main()
