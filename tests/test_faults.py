"""Faults real deployments see, injected into real worker processes on a real Redis.

Each test compares what reached the database with exact totals of the input.
Destructive faults (a stopped worker, a locked database) touch only the test's
own processes, files and namespace; nothing here is sent to a shared server
that other tests could feel.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
import testkit
from testkit import phonon_command

from phonon_cli.core.update import end_sessions
from phonon_cli.store.keys import Keys

pytestmark = [pytest.mark.slow, pytest.mark.faults]

CONFIG = """
[cache]
soft_session = "1h"
hard_session = "1h"

[[routes]]
update = "phonon_cli.sinks.sql:Counter"
id = "{{k}}"
collection = "totals"
database = "sqlite:///{db}"
spec = {{ k = "{{k}}" }}
doc = {{ c = 1 }}
"""


def config(tmp_path: Path) -> tuple[Path, Path]:
    db = tmp_path / "totals.db"
    path = tmp_path / "totals.toml"
    path.write_text(CONFIG.format(db=db))
    return path, db


def lines(keys: range, times: int = 1) -> bytes:
    return b"".join(orjson.dumps({"k": f"k{i}"}) + b"\n" for _ in range(times) for i in keys)


def table(db: Path) -> Counter[str]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return Counter(dict(conn.execute("SELECT k, c FROM totals").fetchall()))
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return Counter()
        raise
    finally:
        conn.close()


def feed(worker: subprocess.Popen[bytes], data: bytes, close: bool = False) -> None:
    assert worker.stdin is not None
    worker.stdin.write(data)
    worker.stdin.flush()
    if close:
        worker.stdin.close()


def start(
    redis_url: str, namespace: str, cfg: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A ``phonon run`` reading stdin; its stderr goes to a file (a pipe nobody reads
    could fill up and block a worker that logs a lot)."""
    log = cfg.parent / f"worker-{time.monotonic_ns()}.log"
    cmd = [*phonon_command(redis_url, namespace), "run", "-c", str(cfg), *args]
    with open(log, "wb") as err:
        worker = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stderr=err, env={**os.environ, **(env or {})}
        )
    worker.log = log  # type: ignore[attr-defined]
    _started.append(worker)
    return worker


_started: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_worker_left() -> Iterator[None]:
    """A failed test must not leave its workers running (or their pipes open)."""
    yield
    while _started:
        worker = _started.pop()
        if worker.poll() is None:
            worker.kill()
        finish(worker)


def finish(worker: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int, str]:
    """Close its input, wait for its exit; (exit code, stderr)."""
    if worker.stdin is not None and not worker.stdin.closed:
        worker.stdin.close()
    try:
        worker.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
    return worker.returncode, worker.log.read_text(errors="replace")  # type: ignore[attr-defined]


def alive_ids(client, namespace: str) -> set[str]:
    ids = client.zrange(Keys(namespace).processes, 0, -1)
    return {pid for pid in ids if client.exists(Keys(namespace).alive(pid))}


def exec_keys(client, namespace: str) -> list[str]:
    return list(client.scan_iter(match=f"{namespace}:ref:*:exec:*", count=1000))


def test_survivor_writing_to_a_locked_database_is_not_declared_dead(
    redis_url, namespace, tmp_path, client, helpers
) -> None:
    """Recovery executes a dead worker's orphans into a database locked for longer
    than the dead timeout: the survivor doing it keeps beating, nobody declares it
    dead, and the totals come out exact once the lock is gone."""
    cfg, db = config(tmp_path)
    survivors = [start(redis_url, namespace, cfg) for _ in range(2)]
    holder = start(redis_url, namespace, cfg)
    feed(holder, lines(range(10)))  # holds k0..k9; its own events die with it
    helpers.wait_for(lambda: helpers.events_read(client, namespace).get, what="start")
    helpers.wait_for(
        lambda: sum(helpers.events_read(client, namespace).values()) >= 10, what="holder read"
    )
    helpers.wait_for(
        lambda: client.hlen(f"{namespace}:ref:{{totals:k9}}:nodes") == 1, what="references"
    )
    cacher = start(redis_url, namespace, cfg)
    feed(cacher, lines(range(10), times=3), close=True)
    assert finish(cacher)[0] == 0  # deposited: the holder still holds every key
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("PRAGMA journal_mode=WAL")
    locker.execute("BEGIN EXCLUSIVE")
    try:
        ids = alive_ids(client, namespace)
        assert len(ids) == 3
        holder.send_signal(signal.SIGKILL)
        finish(holder)
        helpers.wait_for(lambda: exec_keys(client, namespace), what="a survivor executing")
        survivor_ids = alive_ids(client, namespace)
        assert len(survivor_ids) == 2
        until = time.monotonic() + 2.0  # over three times the 0.6 s dead timeout
        while time.monotonic() < until:
            assert alive_ids(client, namespace) >= survivor_ids, "a live survivor was declared dead"
            time.sleep(0.02)
    finally:
        locker.execute("COMMIT")
        locker.close()
    helpers.wait_for(lambda: table(db) == Counter({f"k{i}": 3 for i in range(10)}), what="totals")
    for worker in survivors:
        code, err = finish(worker)
        assert code == 0, err
        # Writes that failed while the lock was held were made afterwards: nothing is
        # left waiting, and the exit message says so rather than counting the failures.
        assert "wait in redis" not in err
    assert table(db) == Counter({f"k{i}": 3 for i in range(10)})


def stopped(worker: subprocess.Popen[bytes]) -> bool:
    """Whether the process is stopped (SIGSTOP): its state in /proc is T."""
    stat = Path(f"/proc/{worker.pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.parametrize("point", ["before-execute", "after-execute"])
def test_worker_paused_while_executing_is_fenced_and_counts_once(
    redis_url, namespace, tmp_path, client, helpers, point
) -> None:
    """A worker stops (like a long GC pause or a frozen VM) holding partials it took
    to execute, past its dead timeout, before or after writing them; a survivor
    declares it dead and executes them. The same set written twice (by the worker
    once it resumes, or already by it before it stopped) is counted once."""
    cfg, db = config(tmp_path)
    survivor = start(redis_url, namespace, cfg)
    paused = start(redis_url, namespace, cfg, env={"PHONON_FAULT": f"{point}:stop"})
    feed(paused, lines(range(10)))
    helpers.wait_for(
        lambda: (
            all(
                client.hexists(f"{namespace}:ref:{{totals:k{i}}}:nodes", pid)
                for i in range(10)
                for pid in client.zrange(Keys(namespace).processes, 0, -1)
                if client.hget(Keys(namespace).process(pid), "pid") == str(paused.pid)
            )
            and client.hlen(f"{namespace}:ref:{{totals:k9}}:nodes") == 1
        ),
        what="the worker holding every key",
    )
    cacher = start(redis_url, namespace, cfg)
    feed(cacher, lines(range(10), times=2), close=True)
    assert finish(cacher)[0] == 0  # deposited: the paused worker still holds every key
    paused.stdin.close()  # it is now the last holder: it takes the partials and stops
    helpers.wait_for(lambda: stopped(paused), what="the worker stopped mid-execute")
    expected = Counter({f"k{i}": 3 for i in range(10)})
    try:
        helpers.wait_for(lambda: len(table(db)) == 10, what="the survivor's execute")
    finally:
        paused.send_signal(signal.SIGCONT)
    code, err = finish(paused)
    assert code == 0, err
    code, err = finish(survivor)
    assert code == 0, err
    assert table(db) == expected
    assert exec_keys(client, namespace) == []


def test_a_reset_store_is_noticed_and_the_workers_exit_1(private_redis, tmp_path) -> None:
    """Redis loses the namespace's state mid-run (a restart without persistence,
    FLUSHALL): each worker notices at its next batch, says so, and exits 1 instead
    of going on with totals that silently miss what Redis held."""
    cfg, db = config(tmp_path)
    client = redis.Redis.from_url(private_redis, decode_responses=True)
    workers = [start(private_redis, "reset", cfg) for _ in range(2)]
    for worker in workers:
        feed(worker, lines(range(10)))
    testkit.wait_for(
        lambda: client.hlen("reset:ref:{totals:k9}:nodes") == 2, what="both workers holding k9"
    )
    client.flushall()
    for worker in workers:
        feed(worker, lines(range(10, 20)))
    for worker in workers:
        code, err = finish(worker)
        assert code == 1, err
        assert "was reset" in err and "lost its state" in err, err
    client.close()


def test_dropped_connections_are_survived_with_exact_totals(private_redis, tmp_path) -> None:
    """Every client connection is killed (CLIENT KILL) several times mid-run: the
    workers reconnect and go on, exit 0, and the totals are exact."""
    cfg, db = config(tmp_path)
    client = redis.Redis.from_url(private_redis, decode_responses=True)
    workers = [start(private_redis, "drops", cfg, "--soft-session", "0.2") for _ in range(2)]
    testkit.wait_for(
        lambda: client.zcard(Keys("drops").processes) == 2, what="both workers up", timeout_s=60
    )
    expected: Counter[str] = Counter()
    for round_ in range(5):
        for n, worker in enumerate(workers):
            keys = range(round_ * 7 + n, round_ * 7 + n + 30)
            feed(worker, lines(keys, times=2))
            expected.update({f"k{i}": 2 for i in keys})
        time.sleep(0.3)
        killed = client.client_kill_filter(_type="normal", skipme=True)
        assert killed >= 2
    for worker in workers:
        code, err = finish(worker)
        assert code == 0, err
    assert table(db) == expected
    assert exec_keys(client, "drops") == []
    client.close()


@pytest.mark.parametrize("update", ["WidgetUpdate", "CountingUpdate"])
def test_a_batch_whose_reply_was_lost_is_applied_once(
    make_process, tmp_path, monkeypatch, update
) -> None:
    """Redis ran a batch and the connection dropped before its reply arrived: the
    batch is sent again and recognised, so a deposit is made once and partials
    taken by the last holder are taken (and written) once."""
    import widgets

    from phonon_cli import faults

    out = tmp_path / "out.jsonl"
    out.touch()
    monkeypatch.setenv("PHONON_TEST_OUT", str(out))
    cls = getattr(widgets, update)
    a, b = make_process(), make_process()
    held = [cls(b, f"k{i}", doc={"c": 1}) for i in range(5)]
    mine = [cls(a, f"k{i}", doc={"c": 10}) for i in range(5)]
    faults.plan("lost-reply:drop")
    try:
        assert end_sessions(mine) == [False] * 5  # deposited (b holds every key), reply lost
        faults.plan("lost-reply:drop")
        assert end_sessions(held) == [True] * 5  # b takes a's partials, reply lost
    finally:
        faults.plan("")
    written = Counter()
    for line in out.read_bytes().splitlines():
        record = orjson.loads(line)
        written[record["resource"]] += record["doc"]["c"]
    assert written == Counter({f"k{i}": 11 for i in range(5)})


def test_a_store_away_is_waited_for_and_past_the_timeout_ends_the_run(
    private_server, tmp_path
) -> None:
    """The store goes away with batches to send. Back within --store-timeout: the
    worker goes on, exit 0, exact totals. Away for longer: exit 1 naming the store."""
    cfg, db = config(tmp_path)
    url = private_server.url
    client = redis.Redis.from_url(url, decode_responses=True)
    worker = start(url, "away", cfg, "--soft-session", "0.1")
    testkit.wait_for(
        lambda: client.zcard(Keys("away").processes) == 1, what="worker up", timeout_s=60
    )
    feed(worker, lines(range(10)))
    testkit.wait_for(lambda: len(table(db)) == 10, what="first writes")
    private_server.stop()
    feed(worker, lines(range(10)))
    time.sleep(1.0)  # the store is away while the worker's sessions end
    private_server.start()
    code, err = finish(worker)
    assert code == 0, err
    assert "store unreachable" in err
    assert table(db) == Counter({f"k{i}": 2 for i in range(10)})

    impatient = start(url, "away", cfg, "--soft-session", "0.1", env={"PHONON_STORE_TIMEOUT": "2"})
    testkit.wait_for(
        lambda: client.zcard(Keys("away").processes) == 1, what="worker up", timeout_s=60
    )
    private_server.stop()
    feed(impatient, lines(range(10)))
    impatient.stdin.close()
    code, err = finish(impatient)
    private_server.start()
    assert code == 1, err
    assert "lost the store" in err and str(private_server.sock) in err
    client.close()


def test_a_survivor_killed_writing_what_it_adopted_holds_up_no_recovery(
    redis_url, namespace, tmp_path, client
) -> None:
    """A worker is killed just before writing its last five keys: their sets wait in
    Redis, their events marked as counted. The next worker adopts those sets and is
    killed writing them. Nothing may wait for that: the next run and ``flush -c``
    write every event at once. (They waited for the recovery lock the killed
    survivor held while writing, for its 60 s TTL, and ``flush -c`` said "executed
    0" and exited 0 meanwhile: the five keys one event short each.)"""
    cfg, db = config(tmp_path)
    topic = tmp_path / "topic.jsonl"
    topic.write_bytes(lines(range(5)))
    args = ("--source", f"file:{topic}", "--max-entries", "5")
    kill = {"PHONON_FAULT": "before-execute:kill:1"}
    code, err = finish(start(redis_url, namespace, cfg, *args, env=kill))
    assert code == -signal.SIGKILL, err  # in its last batch: the five keys
    # --follow: it runs until its recovery writes the adopted sets (and is killed)
    code, err = finish(start(redis_url, namespace, cfg, *args, "--follow", env=kill))
    assert code == -signal.SIGKILL, err
    code, err = finish(start(redis_url, namespace, cfg, *args))
    assert code == 0, err
    # The killed survivor's sets are its own exec keys now: flush -c recovers them
    # once it counts as dead (three heartbeats), not after the lock's 60 s.
    testkit.wait_for(lambda: not alive_ids(client, namespace), what="the killed count as dead")
    flushed = subprocess.run(
        [*phonon_command(redis_url, namespace), "flush", "--all", "-c", str(cfg)],
        capture_output=True,
        timeout=60,
    )
    assert flushed.returncode == 0, flushed.stderr
    assert table(db) == Counter({f"k{i}": 1 for i in range(5)})
    assert exec_keys(client, namespace) == []


def test_a_survivor_killed_before_claiming_the_orphans_it_found_leaves_them_to_the_next(
    redis_url, namespace, tmp_path, client, helpers
) -> None:
    """A worker holding ten keys is killed; the partials others deposited on them
    are orphans once it is recovered. The survivor recovering it is killed just
    after taking it off the nodelists, before claiming those orphans. The next
    worker must find them and write them, without ``flush -c``. (The killed one
    was forgotten under the recovery lock, before its orphans were claimed: nobody
    looked for them again, and the ten keys stayed in Redis.)"""
    cfg, db = config(tmp_path)
    holder = start(redis_url, namespace, cfg)
    feed(holder, lines(range(10)))  # holds k0..k9; its own events die with it
    helpers.wait_for(
        lambda: client.hlen(f"{namespace}:ref:{{totals:k9}}:nodes") == 1, what="references"
    )
    cacher = start(redis_url, namespace, cfg)
    feed(cacher, lines(range(10), times=3), close=True)
    assert finish(cacher)[0] == 0  # deposited: the holder still holds every key
    holder.send_signal(signal.SIGKILL)
    finish(holder)
    survivor = start(redis_url, namespace, cfg, env={"PHONON_FAULT": "before-orphans:kill"})
    survivor.wait(timeout=30)  # its stdin open: it runs until the fault kills it
    code, err = finish(survivor)
    assert code == -signal.SIGKILL, err
    assert table(db) == Counter()
    survivor = start(redis_url, namespace, cfg)
    try:
        helpers.wait_for(
            lambda: table(db) == Counter({f"k{i}": 3 for i in range(10)}),
            what="the orphans written by the next worker",
        )
    finally:
        code, err = finish(survivor)
    assert code == 0, err
    assert exec_keys(client, namespace) == []


def test_a_worker_restarted_at_once_reads_what_the_killed_one_held(
    redis_url, namespace, tmp_path, client
) -> None:
    """A ``file:`` worker is killed holding its events only in memory, and a worker is
    started at once, without ``--follow``, while the killed one still counts as
    alive (its alive key lives three heartbeats) and so still owns the partition.
    The new worker must not end having read nothing: it waits to hear from the
    owner, which expires, takes the partition over and counts every event. (It
    ended at once, exit 0, "events read 0": the killed worker's last keys were
    never counted, as in the kill -9 test's five keys one event short.)"""
    cfg, db = config(tmp_path)
    topic = tmp_path / "topic.jsonl"
    topic.write_bytes(lines(range(5)))
    source = ("--source", f"file:{topic}")
    # Beats every second: it counts as alive for 3 s after the kill.
    held = [*phonon_command(redis_url, namespace), "--heartbeat-interval", "1"]
    log = tmp_path / "held.log"
    with open(log, "wb") as err:
        cmd = [*held, "run", "-c", str(cfg), *source, "--follow"]
        holder = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=err)
    try:
        testkit.wait_for(
            lambda: sum(testkit.events_read(client, namespace).values()) == 5, what="all read"
        )
    finally:
        holder.kill()
        holder.wait()
    assert alive_ids(client, namespace), "the killed worker must still count as alive"
    code, err = finish(start(redis_url, namespace, cfg, *source))
    assert code == 0, err
    assert "events read 5" in err
    # What it could only deposit (the dead one was still on the keys' nodelists)
    # is written once the dead one is recovered.
    flushed = subprocess.run(
        [*phonon_command(redis_url, namespace), "flush", "--all", "-c", str(cfg)],
        capture_output=True,
        timeout=60,
    )
    assert flushed.returncode == 0, flushed.stderr
    assert table(db) == Counter({f"k{i}": 1 for i in range(5)})


def test_a_stream_worker_restarted_at_once_claims_what_the_killed_one_held(
    redis_url, namespace, tmp_path, client
) -> None:
    """A ``redis-stream:`` worker is killed holding its entries only in memory
    (pending, unacknowledged), and a worker is started at once, without
    ``--follow``, while the killed one still counts as alive. The new worker must
    not end having claimed nothing: it waits to hear from the consumer's owner,
    which expires, claims its pending entries and counts them. (It ended at once,
    exit 0, "events read 0", the entries left pending for another run.)"""
    cfg, db = config(tmp_path)
    key = f"{namespace}-stream"
    for line in lines(range(5)).splitlines():
        client.xadd(key, {"data": line})
    source = ("--source", f"redis-stream:{key}")
    # Beats every second: it counts as alive for 3 s after the kill.
    held = [*phonon_command(redis_url, namespace), "--heartbeat-interval", "1"]
    log = tmp_path / "held.log"
    try:
        with open(log, "wb") as err:
            cmd = [*held, "run", "-c", str(cfg), *source, "--follow"]
            holder = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=err)
        try:
            testkit.wait_for(
                lambda: sum(testkit.events_read(client, namespace).values()) == 5,
                what="all read",
            )
        finally:
            holder.kill()
            holder.wait()
        assert alive_ids(client, namespace), "the killed worker must still count as alive"
        assert client.xpending(key, "phonon")["pending"] == 5
        code, err = finish(start(redis_url, namespace, cfg, *source))
        assert code == 0, err
        assert "events read 5" in err
        # What it could only deposit (the dead one was still on the keys' nodelists)
        # is written once the dead one is recovered.
        flushed = subprocess.run(
            [*phonon_command(redis_url, namespace), "flush", "--all", "-c", str(cfg)],
            capture_output=True,
            timeout=60,
        )
        assert flushed.returncode == 0, flushed.stderr
        assert client.xpending(key, "phonon")["pending"] == 0
        assert table(db) == Counter({f"k{i}": 1 for i in range(5)})
    finally:
        client.delete(key)


CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
KILL_ROUNDS = 20 if CI else 4
"""Rounds of kill -9 and restart: the full count in CI, a short version in ``make test``."""

WRITES = ("before-execute", "after-execute")
ANYWHERE = (*WRITES, "in-recovery")


@pytest.mark.parametrize(
    ("seed", "entries", "points"),
    [
        pytest.param(20, 5, WRITES, id="cache5-writes"),
        pytest.param(101, 20, ANYWHERE, id="cache20-anywhere"),
    ],
)
def test_kill_9_at_random_points_on_a_file_source_counts_every_event_once(
    redis_url, namespace, tmp_path, client, seed, entries, points
) -> None:
    """A worker on a ``file:`` partition is killed (SIGKILL, by a fault point just
    before or just after one of its writes, or inside recovery, at random) and
    started again, round after round, with a small cache so that deposits and
    writes run far ahead of the committed offset. Each round first appends new
    events, so that every round has work to be killed in. Once a run gets to the
    end and the orphans are flushed, every event is counted exactly once: replayed
    events that a deposit or a write already covered are skipped, and what a
    killed survivor was recovering is recovered by the next one at once."""
    import random

    rng = random.Random(seed)
    cfg, db = config(tmp_path)
    topic = tmp_path / "topic.jsonl"
    events = [{"k": f"k{rng.randrange(40)}"} for _ in range(3000)]
    expected = Counter(e["k"] for e in events)
    step = -(-len(events) // KILL_ROUNDS)
    topic.write_bytes(b"")
    args = ("--source", f"file:{topic}", "--max-entries", str(entries))
    killed = 0
    for start_at in range(0, len(events), step):
        with topic.open("ab") as f:
            f.write(b"".join(orjson.dumps(e) + b"\n" for e in events[start_at : start_at + step]))
        # The first few writes (or recovery passes) of a run: most runs reach them.
        point, nth = rng.choice(points), rng.randint(1, 3)
        if point == "in-recovery" and not killed:
            point, nth = "before-execute", 1  # nothing to recover before a first kill
        fault = f"{point}:kill:{nth}"
        code, err = finish(start(redis_url, namespace, cfg, *args, env={"PHONON_FAULT": fault}))
        assert code in (0, -signal.SIGKILL), err
        killed += code == -signal.SIGKILL
    assert killed >= KILL_ROUNDS // 4, f"only {killed} of {KILL_ROUNDS} rounds were killed"
    code, err = finish(start(redis_url, namespace, cfg, *args))  # no fault: to the end
    assert code == 0, err
    flushed = subprocess.run(
        [*phonon_command(redis_url, namespace), "flush", "--all", "-c", str(cfg)],
        capture_output=True,
        timeout=60,
    )
    assert flushed.returncode == 0, flushed.stderr
    assert table(db) == expected
    assert exec_keys(client, namespace) == []


TWO_ROUTES = (
    CONFIG
    + """
[[routes]]
update = "phonon_cli.sinks.sql:Counter"
id = "{{g}}"
collection = "groups"
database = "sqlite:///{db}"
spec = {{ g = "{{g}}" }}
doc = {{ c = 1 }}
"""
)
"""CONFIG's route on ``k`` and a second on ``g``: one event, two keys."""


def test_kill_9_on_a_file_source_counts_an_event_of_several_keys_once_on_each(
    redis_url, namespace, tmp_path, client
) -> None:
    """Each event feeds two keys (two routes), which leave the cache at different
    times: a kill -9 can come after one of them deposited or wrote the event and
    before the other did. The replay after the restart skips the event exactly on
    the keys whose marks cover it and counts it on the others."""
    import random

    rng = random.Random(10)
    db = tmp_path / "totals.db"
    cfg = tmp_path / "two.toml"
    cfg.write_text(TWO_ROUTES.format(db=db))
    topic = tmp_path / "topic.jsonl"
    events = [{"k": f"k{rng.randrange(40)}", "g": f"g{rng.randrange(7)}"} for _ in range(2000)]
    topic.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    args = ("--source", f"file:{topic}", "--max-entries", "6")
    for _ in range(max(3, KILL_ROUNDS // 2)):
        point = rng.choice(["before-execute", "after-execute"])
        worker = start(
            redis_url,
            namespace,
            cfg,
            *args,
            env={"PHONON_FAULT": f"{point}@loop:kill:{rng.randint(1, 8)}"},
        )
        code, err = finish(worker)
        assert code in (0, -signal.SIGKILL), err
    code, err = finish(start(redis_url, namespace, cfg, *args))  # no fault: to the end
    assert code == 0, err
    flushed = subprocess.run(
        [*phonon_command(redis_url, namespace), "flush", "--all", "-c", str(cfg)],
        capture_output=True,
        timeout=60,
    )
    assert flushed.returncode == 0, flushed.stderr
    conn = sqlite3.connect(db, timeout=30)
    try:
        groups = Counter(dict(conn.execute("SELECT g, c FROM groups").fetchall()))
    finally:
        conn.close()
    assert table(db) == Counter(e["k"] for e in events)
    assert groups == Counter(e["g"] for e in events)


def worker_id(client, namespace: str, worker: subprocess.Popen[bytes]) -> str | None:
    """The process id a worker (an OS process) is registered under now."""
    keys = Keys(namespace)
    for pid in client.zrange(keys.processes, 0, -1):
        if client.hget(keys.process(pid), "pid") == str(worker.pid):
            return pid
    return None


def test_a_fenced_file_worker_drops_what_a_survivor_reads_again(
    redis_url, namespace, tmp_path, client, helpers
) -> None:
    """A worker on a ``file:`` partition holds every event in its cache, is paused
    past its dead timeout, and a survivor takes the partition over, reading it from
    the committed offset. Resumed and fenced, the worker must not deposit those
    events under its new id as well: it drops them, and totals stay exact."""
    cfg, db = config(tmp_path)
    topic = tmp_path / "topic.jsonl"
    events = [{"k": f"k{i % 30}"} for i in range(3000)]
    topic.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    args = ("--source", f"file:{topic}", "--follow")
    paused = start(redis_url, namespace, cfg, *args)
    helpers.wait_for(
        lambda: sum(helpers.events_read(client, namespace).values()) >= 3000, what="all read"
    )
    old = worker_id(client, namespace, paused)
    paused.send_signal(signal.SIGSTOP)
    survivor = start(redis_url, namespace, cfg, *args)
    try:
        helpers.wait_for(
            lambda: (
                client.zscore(Keys(namespace).processes, old) is None
                and helpers.events_read(client, namespace).get(
                    worker_id(client, namespace, survivor)
                )
                == 3000
            ),
            timeout_s=20,
            what="the paused worker declared dead, the survivor read the partition again",
        )
    finally:
        paused.send_signal(signal.SIGCONT)
    helpers.wait_for(
        lambda: "fenced" in paused.log.read_text(errors="replace"),  # type: ignore[attr-defined]
        what="the worker fenced",
    )
    for worker in (paused, survivor):
        worker.send_signal(signal.SIGTERM)
    for worker in (paused, survivor):
        code, err = finish(worker)
        assert code == 0, err
    assert table(db) == Counter(e["k"] for e in events)


def test_a_fenced_stream_worker_counts_its_old_consumers_entries_once(
    redis_url, namespace, tmp_path, client, helpers
) -> None:
    """A ``redis-stream:`` worker with a tiny cache has deposited many entries it has
    not acknowledged yet and holds others only in memory, when it is paused past its
    dead timeout. A survivor claims its consumer's pending entries: those a deposit
    covered are skipped (the consumer's marks), the others counted. Resumed and
    fenced, the worker drops what it held of them and reads as a new consumer; what
    it read as the old one meanwhile is claimed too. Every entry is counted once."""
    cfg, db = config(tmp_path)
    key = f"{namespace}-stream"
    expected: Counter[str] = Counter()
    n = [0]

    def add(count: int) -> None:
        pipe = client.pipeline(transaction=False)
        for _ in range(count):
            # Every other event on one hot key, which so stays cached and holds the
            # acknowledgements back while the others are deposited.
            k = "hot" if n[0] % 2 else f"k{(n[0] * 7) % 30}"
            n[0] += 1
            expected[k] += 1
            pipe.xadd(key, {"data": orjson.dumps({"k": k})})
        pipe.execute()

    def settled() -> bool:
        """Every entry delivered, and none pending on a dead process's consumer."""
        group = next(g for g in client.xinfo_groups(key) if g["name"] == "phonon")
        if group["last-delivered-id"] != client.xinfo_stream(key)["last-generated-id"]:
            return False
        consumers = client.xinfo_consumers(key, "phonon")
        owners = {c["name"].partition("~")[0] for c in consumers if c["pending"]}
        return owners <= alive_ids(client, namespace)

    args = ("--source", f"redis-stream:{key}", "--follow", "--max-entries", "5")
    paused = start(redis_url, namespace, cfg, *args)
    try:
        add(2000)
        helpers.wait_for(
            lambda: sum(helpers.events_read(client, namespace).values()) >= 2000, what="all read"
        )
        # Deposited, not acknowledged (the hot key's first entry holds them back).
        assert client.xpending(key, "phonon")["pending"] > 1500
        old = worker_id(client, namespace, paused)
        paused.send_signal(signal.SIGSTOP)
        survivor = start(redis_url, namespace, cfg, *args)
        add(500)
        try:
            helpers.wait_for(
                lambda: client.zscore(Keys(namespace).processes, old) is None and settled(),
                timeout_s=20,
                what="the paused worker declared dead, its entries claimed",
            )
        finally:
            paused.send_signal(signal.SIGCONT)
        add(500)
        helpers.wait_for(
            lambda: "fenced" in paused.log.read_text(errors="replace"),  # type: ignore[attr-defined]
            what="the worker fenced",
        )
        helpers.wait_for(settled, timeout_s=20, what="every entry delivered and claimed")
        for worker in (paused, survivor):
            worker.send_signal(signal.SIGTERM)
        for worker in (paused, survivor):
            code, err = finish(worker)
            assert code == 0, err
        assert client.xpending(key, "phonon")["pending"] == 0
        assert table(db) == expected
    finally:
        client.delete(key)


def test_a_claimer_paused_before_claiming_takes_nothing_another_claimed_since(
    redis_url, namespace, tmp_path, client, helpers
) -> None:
    """A ``redis-stream:`` worker is killed holding its entries pending, uncounted.
    A survivor stops (SIGSTOP, like a long GC pause) just before it claims them,
    past its dead timeout; a second survivor claims them, counts most of them (its
    deposits and writes mark them under its own consumer) and acknowledges none
    yet (a hot key holds them back). The first resumes: it must not take back what
    the second claimed since, or those entries are counted again under a consumer
    whose marks never covered them. (It did: every entry counted twice.)"""
    cfg, db = config(tmp_path)
    key = f"{namespace}-stream"
    keys = [f"k{(i * 7) % 30}" if i % 2 else "hot" for i in range(400)]
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.xadd(key, {"data": orjson.dumps({"k": k})})
    pipe.execute()
    source = f"redis-stream:{key}"
    args = ("--source", source, "--follow", "--max-entries", "5")
    try:
        # It holds every key in memory: nothing it read is counted, or marked, yet.
        killed = start(redis_url, namespace, cfg, "--source", source, "--follow")
        helpers.wait_for(
            lambda: sum(helpers.events_read(client, namespace).values()) >= 400, what="all read"
        )
        killed.kill()
        finish(killed)
        assert client.xpending(key, "phonon")["pending"] == 400
        paused = start(redis_url, namespace, cfg, *args, env={"PHONON_FAULT": "before-claim:stop"})
        helpers.wait_for(lambda: stopped(paused), what="the claimer stopped before claiming")
        old = worker_id(client, namespace, paused)
        survivor = start(redis_url, namespace, cfg, *args)
        try:
            seen = [Keys(namespace).resource(f"totals:{k}").seen for k in set(keys)]
            helpers.wait_for(
                lambda: (
                    client.zscore(Keys(namespace).processes, old) is None
                    and (me := worker_id(client, namespace, survivor)) is not None
                    and sum(client.hexists(s, f"{source}|{me}~1") for s in seen) >= 10
                ),
                timeout_s=20,
                what="the paused claimer declared dead, the survivor counting what it claimed",
            )
            assert client.xpending(key, "phonon")["pending"] == 400  # none acknowledged
        finally:
            paused.send_signal(signal.SIGCONT)
        helpers.wait_for(
            lambda: "fenced" in paused.log.read_text(errors="replace"),  # type: ignore[attr-defined]
            what="the claimer fenced",
        )

        def settled() -> bool:
            """None pending on a dead process's consumer."""
            consumers = client.xinfo_consumers(key, "phonon")
            owners = {c["name"].partition("~")[0] for c in consumers if c["pending"]}
            return owners <= alive_ids(client, namespace)

        helpers.wait_for(settled, timeout_s=20, what="nothing pending on a dead consumer")
        for worker in (paused, survivor):
            worker.send_signal(signal.SIGTERM)
        for worker in (paused, survivor):
            code, err = finish(worker)
            assert code == 0, err
        assert client.xpending(key, "phonon")["pending"] == 0
        assert table(db) == Counter(keys)
    finally:
        client.delete(key)


@pytest.mark.parametrize(
    ("seed", "points", "where"),
    [
        pytest.param(30, WRITES, "@loop", id="writes"),
        pytest.param(61, ANYWHERE, "", id="anywhere"),
    ],
)
def test_kill_9_at_random_points_on_a_stream_counts_every_entry_once(
    redis_url, namespace, tmp_path, client, seed, points, where
) -> None:
    """A ``redis-stream:`` worker with a tiny cache is killed just before or after
    one of its writes, round after round; each next worker claims the dead
    consumers' pending entries, many of them deposited or written already but not
    acknowledged (a hot key holds the acknowledgements back), and skips them on the
    keys whose marks cover them. After a last run and a flush, every entry is
    counted once and nothing is pending. In the "anywhere" variant a kill can also
    land while a worker recovers a dead one (``in-recovery``) or writes what it
    adopted, so a claimer often dies holding entries it skipped: they are claimed
    again by the next one and checked against the marks of every consumer they went
    through (``stream-lineage``), not only the claimer's, which never covered them."""
    import random

    rng = random.Random(seed)
    cfg, db = config(tmp_path)
    key = f"{namespace}-stream"
    keys = ["hot" if i % 2 else f"k{rng.randrange(30)}" for i in range(2000)]
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.xadd(key, {"data": orjson.dumps({"k": k})})
    pipe.execute()
    args = ("--source", f"redis-stream:{key}", "--max-entries", "5")
    try:
        for _ in range(max(3, KILL_ROUNDS // 2)):
            # Each round starts once the last killed one counts as dead: its pending
            # entries are then claimed (and chains of claimers form) in every round,
            # rather than a round ending at once with nothing it may claim yet.
            testkit.wait_for(lambda: not alive_ids(client, namespace), what="the killed one dead")
            point = rng.choice(points)
            fault = f"{point}{where}:kill:{rng.randint(1, 2)}"  # a run writes in few batches
            code, err = finish(start(redis_url, namespace, cfg, *args, env={"PHONON_FAULT": fault}))
            assert code in (0, -signal.SIGKILL), err
        testkit.wait_for(lambda: not alive_ids(client, namespace), what="every killed one dead")
        code, err = finish(start(redis_url, namespace, cfg, *args))
        assert code == 0, err
        flushed = subprocess.run(
            [*phonon_command(redis_url, namespace), "flush", "--all", "-c", str(cfg)],
            capture_output=True,
            timeout=60,
        )
        assert flushed.returncode == 0, flushed.stderr
        assert client.xpending(key, "phonon")["pending"] == 0
        assert table(db) == Counter(keys)
    finally:
        client.delete(key)


def test_flush_c_right_after_a_kill_waits_for_the_killed_to_count_as_dead(
    redis_url, namespace, tmp_path, client
) -> None:
    """A worker is killed (kill -9) holding the sets of its last five keys, taken out
    to write: they are its own exec keys, which only its recovery may take, and it
    counts as alive until its alive key expires (three heartbeats). ``flush -c`` run
    at once printed "executed 0" and exited 0 while the five waited. Now, given no
    time (``--timeout 0``), it lists them, names their holder and says until when it
    counts as alive, and exits 1; by default it waits for the holder to count as
    dead, recovers it, and writes all five once."""
    cfg, db = config(tmp_path)
    topic = tmp_path / "topic.jsonl"
    topic.write_bytes(lines(range(5)))
    args = ("--source", f"file:{topic}", "--max-entries", "5")
    slow = ["--heartbeat-interval", "2"]  # alive for 6 s after the kill: time to look
    log = tmp_path / "killed.log"
    cmd = [*phonon_command(redis_url, namespace), *slow, "run", "-c", str(cfg), *args]
    with open(log, "wb") as err:
        env = {**os.environ, "PHONON_FAULT": "before-execute:kill:1"}
        killed = subprocess.run(cmd, stdin=subprocess.DEVNULL, stderr=err, env=env, timeout=60)
    assert killed.returncode == -signal.SIGKILL, log.read_text()
    assert len([k for k in exec_keys(client, namespace) if not k.endswith(":recipe")]) == 5
    (holder,) = alive_ids(client, namespace)

    flush = [*phonon_command(redis_url, namespace), "flush", "--all", "-c", str(cfg)]
    at_once = subprocess.run([*flush, "--timeout", "0"], capture_output=True, text=True)
    assert at_once.returncode == 1, at_once.stderr
    assert sorted(at_once.stdout.split()) == [f"totals:k{i}" for i in range(5)]
    assert "5 set(s) listed above" in at_once.stderr, at_once.stderr
    assert holder in at_once.stderr and "counts as alive" in at_once.stderr, at_once.stderr
    assert table(db) == Counter()

    waited = subprocess.run(flush, capture_output=True, text=True, timeout=60)
    assert waited.returncode == 0, waited.stderr
    assert "waiting up to 30s" in waited.stderr, waited.stderr
    assert table(db) == Counter({f"k{i}": 1 for i in range(5)})
    assert exec_keys(client, namespace) == []
    assert not alive_ids(client, namespace)
