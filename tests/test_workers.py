"""``phonon run --workers N`` with real processes: N workers started by one command,
each a full member; totals checked in SQLite against the generated events."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from phonon_cli.store.keys import Keys

pytestmark = pytest.mark.slow

CONFIG = """
[[routes]]
update = "phonon_cli.sinks.sql:Counter"
id = "{k}"
collection = "counts"
database = "sqlite:///DB"
spec = { k = "{k}" }
doc = { n = "{n}", c = 1 }
"""


@dataclass
class Run:
    url: str
    ns: str
    tmp: Path
    client: Any
    helpers: Any
    expected: Counter[str] = field(default_factory=Counter)
    count: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(5))

    def events(self, n: int) -> bytes:
        out = []
        for _ in range(n):
            k, v = f"k{self.rng.randrange(300)}", self.rng.randrange(1, 6)
            self.expected[k] += v
            self.count += 1
            out.append(orjson.dumps({"k": k, "n": v}) + b"\n")
        return b"".join(out)

    def start(self, *args: str, stdin: Any = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
        cmd = [
            *self.helpers.phonon_command(self.url, self.ns),
            "run",
            "-c",
            str(self.tmp / "cfg.toml"),
            "--dead-letter",
            str(self.tmp / "dead.jsonl"),
            *args,
        ]
        proc = subprocess.Popen(cmd, stdin=stdin, stderr=subprocess.PIPE, cwd=self.tmp)
        self.procs.append(proc)
        return proc

    def totals(self) -> tuple[Counter[str], int]:
        with sqlite3.connect(self.tmp / "db.sqlite") as conn:
            rows = conn.execute("SELECT k, n, c FROM counts").fetchall()
        return Counter({k: n for k, n, _ in rows}), sum(c for _, _, c in rows)

    def members(self) -> dict[str, dict[str, str]]:
        """Live processes of the namespace -> their published figures."""
        out = {}
        for pid in self.client.zrange(Keys(self.ns).processes, 0, -1):
            if self.client.exists(Keys(self.ns).alive(pid)):
                out[pid] = self.client.hgetall(Keys(self.ns).process(pid))
        return out

    def events_read(self, workers: int = 0) -> int:
        """Events the live workers handled, once ``workers`` of them have said (-1 before)."""
        figures = [f for f in self.members().values() if "events_read" in f]
        if len(figures) < workers:
            return -1
        return sum(int(f["events_read"]) for f in figures)


@pytest.fixture
def run(redis_url: str, namespace: str, tmp_path: Path, client: Any, helpers: Any) -> Iterator[Run]:
    (tmp_path / "cfg.toml").write_text(CONFIG.replace("DB", str(tmp_path / "db.sqlite")))
    r = Run(redis_url, namespace, tmp_path, client, helpers)
    yield r
    for proc in r.procs:
        if proc.poll() is None:
            proc.kill()  # its workers see their parent gone and stop
        proc.communicate()


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode()


def test_three_workers_on_stdin_share_it_and_give_exact_totals(run: Run) -> None:
    data = run.events(30_000)
    proc = run.start("--workers", "3", stdin=subprocess.PIPE)
    _, err = proc.communicate(data, timeout=60)
    assert proc.returncode == 0, err.decode()
    assert run.totals() == (run.expected, run.count)
    summary = err.decode().strip().splitlines()[-1]
    assert "events read 30000, routed 30000" in summary
    assert summary.endswith("3 workers")


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def pipes(pid: int) -> dict[int, str]:
    """The process's open descriptors that are pipes: fd -> ``pipe:[inode]``."""
    out = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if target.startswith("pipe:"):
            out[int(fd.name)] = target
    return out


def test_each_workers_stdin_is_open_in_no_other_worker(run: Run) -> None:
    """A worker that held a sibling's stdin pipe open would keep that sibling from
    seeing the end of its input until it exits itself."""
    proc = run.start("--workers", "3", stdin=subprocess.PIPE)
    assert proc.stdin is not None
    run.helpers.wait_for(lambda: len(run.members()) == 3, timeout_s=30, what="three workers")
    workers = children(proc.pid)
    assert len(workers) == 3
    held = {pid: pipes(pid) for pid in workers}
    for pid in workers:
        stdin = held[pid][0]
        others = [p for p in workers if p != pid and stdin in held[p].values()]
        assert others == [], f"worker {pid}'s stdin ({stdin}) is open in {others}"
    _, err = proc.communicate(run.events(1000), timeout=60)
    assert proc.returncode == 0, err.decode()
    assert run.totals() == (run.expected, run.count)


def cpu_seconds(run: Run, *args: str) -> float:
    """User and system CPU of ``phonon run ARGS`` on an empty stdin, its workers included."""
    proc = run.start(*args, stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
    return usage.ru_utime + usage.ru_stime


def test_workers_start_without_importing_phonon_again(run: Run) -> None:
    """The workers are forked from the parent once it has imported what they run: three
    workers cost little more CPU than one process to start (each importing phonon again
    costs about as much as the whole single-process start)."""
    one = min(cpu_seconds(run, "--workers", "1") for _ in range(2))
    three = min(cpu_seconds(run, "--workers", "3") for _ in range(2))
    assert three < 1.8 * one, f"--workers 3 took {three:.2f}s of CPU to start, one {one:.2f}s"


def test_three_workers_on_a_file_topic_split_its_partitions(run: Run) -> None:
    topic = run.tmp / "topic"
    for p in range(6):
        (topic / f"ev-{p}").mkdir(parents=True)
        (topic / f"ev-{p}" / f"{0:020d}.jsonl").write_bytes(run.events(700))
    code, err = finish(run.start("--workers", "3", "--source", f"file:{topic}"))
    assert code == 0, err
    assert run.totals() == (run.expected, run.count)
    assert "events read 4200," in err
    offsets = run.client.hgetall(f"{run.ns}:offsets:phonon:file:{topic}")
    assert offsets == {f"ev-{p}": "700" for p in range(6)}


def test_sigterm_to_the_parent_drains_every_worker_of_a_stream(run: Run) -> None:
    key = f"{run.ns}-events"
    pipe = run.client.pipeline(transaction=False)
    for line in run.events(3000).splitlines():
        pipe.xadd(key, {"data": line})
    pipe.execute()
    proc = run.start("--workers", "3", "--source", f"redis-stream:{key}", "--follow")
    run.helpers.wait_for(
        lambda: run.events_read(workers=3) == 3000,
        timeout_s=30,
        what="three workers read the stream",
    )
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 0, err
    assert run.totals() == (run.expected, run.count)  # executed, not left cached
    assert int(run.client.xpending(key, "phonon")["pending"]) == 0
    assert "events read 3000," in err
    run.client.delete(key)


def test_sigterm_to_the_parent_drains_workers_reading_stdin(run: Run) -> None:
    proc = run.start("--workers", "3", stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(run.events(5000))
    proc.stdin.flush()
    run.helpers.wait_for(
        lambda: run.events_read() == 5000, timeout_s=30, what="every event handled"
    )
    proc.send_signal(signal.SIGTERM)  # stdin still open: only the signal ends the run
    code, err = finish(proc)
    assert code == 0, err
    assert run.totals() == (run.expected, run.count)


def test_a_killed_worker_is_a_dead_process_and_the_others_go_on(run: Run) -> None:
    key = f"{run.ns}-events"
    pipe = run.client.pipeline(transaction=False)
    for line in run.events(3000).splitlines():
        pipe.xadd(key, {"data": line})
    pipe.execute()
    proc = run.start("--workers", "3", "--source", f"redis-stream:{key}", "--follow")
    run.helpers.wait_for(
        lambda: run.events_read(workers=3) == 3000,
        timeout_s=30,
        what="three workers read the stream",
    )
    victim_id, victim = max(run.members().items(), key=lambda m: int(m[1].get("events_read", 0)))
    assert int(victim["events_read"]) > 0
    os.kill(int(victim["pid"]), signal.SIGKILL)
    # Its entries were only in its memory: the survivors claim them as from any dead consumer.
    run.helpers.wait_for(
        lambda: victim_id not in run.members() and run.events_read() == 3000,
        timeout_s=30,
        what="the survivors claimed the dead worker's entries",
    )
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 1, err
    assert f"(pid {victim['pid']}) was killed by SIGKILL" in err
    assert run.totals() == (run.expected, run.count)
    assert int(run.client.xpending(key, "phonon")["pending"]) == 0
    run.client.delete(key)


def test_a_bad_workers_value_is_a_usage_error(run: Run) -> None:
    code, err = finish(run.start("--workers", "none"))
    assert code == 2
    assert "'none' is not a positive number of workers nor 'auto'" in err
