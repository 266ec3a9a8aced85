"""Redis Cluster: one key space spread over several masters, nothing lost or doubled.

Every test here runs against a real 3-master cluster on loopback ports (the
``redis_cluster`` session fixture): real ``phonon run`` processes, real slot
migrations, real kills.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import rediscluster
import testkit
from click.testing import CliRunner
from widgets import WidgetUpdate

from phonon_cli.cli import main
from phonon_cli.core.process import Process
from phonon_cli.core.recovery import declare_dead
from phonon_cli.core.reference import Release, acquire_many, release_many
from phonon_cli.exceptions import Fenced
from phonon_cli.store.keys import Keys

pytestmark = pytest.mark.usefixtures("no_redis_socket_left")

CONFIG = """
[[routes]]
update = "phonon_cli.sinks.sql:Counter"
id = "{k}"
collection = "widgets"
database = "sqlite:///DB"
spec = { k = "{k}" }
doc = { n = "{n}" }
"""


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "w.db"


@pytest.fixture
def config(tmp_path: Path, db: Path) -> Path:
    path = tmp_path / "phonon.toml"
    path.write_text(CONFIG.replace("DB", str(db)))
    return path


def cli(url: str, namespace: str, *args: str, cluster: bool = True) -> tuple[int, str, str]:
    flag = ["--redis-cluster"] if cluster else []
    result = CliRunner().invoke(main, ["--redis-url", url, *flag, "--namespace", namespace, *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def totals(db: Path) -> dict[str, int]:
    if not db.exists():
        return {}
    with sqlite3.connect(db) as conn:
        try:
            return dict(conn.execute("SELECT k, n FROM widgets").fetchall())
        except sqlite3.OperationalError:  # no table: nothing executed yet
            return {}


def make_events(keys: int, count: int, seed: int) -> tuple[bytes, dict[str, int]]:
    rng = random.Random(seed)
    expected: Counter[str] = Counter()
    lines = []
    for _ in range(count):
        k, n = f"k{rng.randrange(keys)}", rng.randint(1, 3)
        expected[k] += n
        lines.append(orjson.dumps({"k": k, "n": n}))
    return b"\n".join(lines) + b"\n", dict(expected)


def evalsha_calls(cluster: rediscluster.Cluster) -> dict[int, int]:
    """EVALSHA calls served so far, per primary (by port)."""
    out = {}
    for node in cluster.primaries():
        c = node.client()
        try:
            stats = c.info("commandstats").get("cmdstat_evalsha", {})
        finally:
            c.close()
        out[node.port] = int(stats.get("calls", 0)) if isinstance(stats, dict) else 0
    return out


def masters_of(cluster: rediscluster.Cluster, namespace: str, resources: list[str]) -> set[int]:
    """The primaries (ports) whose slots hold these resources' keys."""
    c = cluster.client()
    try:
        return {c.get_node_from_key(f"{namespace}:ref:{{{r}}}:nodes").port for r in resources}
    finally:
        c.close()


def namespace_keys(cluster: rediscluster.Cluster, namespace: str) -> list[str]:
    """What is left in the namespace, on every master (SCAN of each)."""
    c = cluster.client()
    try:
        return testkit.namespace_keys(c, namespace)  # type: ignore[arg-type]
    finally:
        c.close()


def worker_command(cluster: rediscluster.Cluster, namespace: str, helpers: object) -> list[str]:
    return [*helpers.phonon_command(cluster.url, namespace), "--redis-cluster"]  # type: ignore[attr-defined]


def test_three_workers_with_tiny_caches_keep_totals_exact_across_masters(
    redis_cluster, cluster_namespace, config, db, tmp_path, helpers
) -> None:
    data, expected = make_events(keys=300, count=6000, seed=11)
    before = evalsha_calls(redis_cluster)
    run = subprocess.run(
        [
            *worker_command(redis_cluster, cluster_namespace, helpers),
            "run",
            "-c",
            str(config),
            "--workers",
            "3",
            "--max-entries",
            "10",
            "--dead-letter",
            str(tmp_path / "dead.jsonl"),
        ],
        input=data,
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr.decode()
    assert totals(db) == expected
    after = evalsha_calls(redis_cluster)
    served = [port for port in after if after[port] > before.get(port, 0)]
    assert len(served) >= 2, (before, after)  # the key space really was spread
    assert len(masters_of(redis_cluster, cluster_namespace, list(expected))) >= 2
    assert namespace_keys(redis_cluster, cluster_namespace) == []


def test_a_batch_is_one_round_trip_per_master_not_per_key(
    redis_cluster, cluster_namespace, monkeypatch
) -> None:
    import redis.connection

    p = Process(redis_cluster.url, namespace=cluster_namespace, cluster=True, start_heartbeat=False)
    try:
        resources = [f"r{i}" for i in range(300)]
        masters = masters_of(redis_cluster, cluster_namespace, resources)
        acquire_many(p, resources)
        sent = [0]
        send = redis.connection.Connection.send_packed_command

        def counting(self, command, check_health=True):  # type: ignore[no-untyped-def]
            sent[0] += 1
            return send(self, command, check_health)

        monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counting)
        releases = [Release(r, "end", "sums", "", "n\t1\n") for r in resources]
        taken = release_many(p, releases)
        monkeypatch.undo()
        assert len(masters) == 3
        # 300 keys on 3 masters: one round trip per master, sent together, plus the
        # fence check before them and the held set after (the process's own slot).
        assert sent[0] == len(masters) + 2
        assert [t is not None and t.items == [] for t in taken] == [True] * 300  # in order
    finally:
        p.stop()
    assert namespace_keys(redis_cluster, cluster_namespace) == []


def test_a_node_that_lost_its_scripts_gets_them_again(redis_cluster, cluster_namespace) -> None:
    p = Process(redis_cluster.url, namespace=cluster_namespace, cluster=True, start_heartbeat=False)
    try:
        victim = redis_cluster.primaries()[0].client()
        victim.script_flush()
        victim.close()
        resources = [f"s{i}" for i in range(60)]
        acquire_many(p, resources)
        assert sorted(p.held_resources()) == sorted(resources)
        taken = release_many(p, [Release(r, "end") for r in resources])
        assert all(t is not None for t in taken)
    finally:
        p.stop()
    assert namespace_keys(redis_cluster, cluster_namespace) == []


def test_status_and_flush_all_wait_on_the_cluster(
    redis_cluster, cluster_namespace, config, db, tmp_path, helpers
) -> None:
    url, ns = redis_cluster.url, cluster_namespace
    worker = subprocess.Popen(
        [
            *worker_command(redis_cluster, ns, helpers),
            "run",
            "-c",
            str(config),
            "--dead-letter",
            str(tmp_path / "dead.jsonl"),
        ],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    data, expected = make_events(keys=40, count=400, seed=3)
    try:
        assert worker.stdin is not None
        worker.stdin.write(data)
        worker.stdin.flush()

        def has_read_all() -> bool:
            code, out, _ = cli(url, ns, "status", "--json")
            assert code == 0
            procs = orjson.loads(out)["processes"]
            return bool(procs) and procs[0].get("events_read") == 400

        helpers.wait_for(has_read_all, timeout_s=30, what="the worker to read every event")
        code, out, _ = cli(url, ns, "status")
        assert code == 0
        assert f"store: redis cluster via {url}" in out
        assert totals(db) == {}  # sessions are long: nothing written yet
        code, _, err = cli(url, ns, "flush", "--all", "--wait", "-c", str(config))
        assert code == 0, err
        assert "1 worker(s) expired 40 entries" in err
        assert totals(db) == expected
        assert worker.poll() is None
    finally:
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err.decode()
    assert totals(db) == expected  # nothing twice
    assert namespace_keys(redis_cluster, ns) == []


def read_executed(out: Path) -> Counter[str]:
    executed: Counter[str] = Counter()
    for line in out.read_bytes().splitlines():
        record = orjson.loads(line)
        executed[record["resource"]] += record["doc"].get("c", 0)
    return executed


def test_a_dead_workers_references_are_recovered_on_every_node(
    redis_cluster, cluster_namespace, tmp_path, helpers, monkeypatch
) -> None:
    url, ns = redis_cluster.url, cluster_namespace
    out = tmp_path / "out.jsonl"
    out.touch()
    monkeypatch.setenv("PHONON_TEST_OUT", str(out))
    monkeypatch.setenv("PHONON_REDIS_CLUSTER", "1")
    keys = [f"k{i}" for i in range(60)]
    assert len(masters_of(redis_cluster, ns, keys)) == 3
    holder = helpers.python_process(
        str(helpers.helpers_dir / "holder.py"), url, ns, "60", stdout=-1
    )
    assert holder.stdout.readline().strip() == "ready"
    holder.stdout.close()
    cacher = Process(url, namespace=ns, heartbeat_interval=0.2, recover_failed_processes=False)
    survivor = None
    try:
        for i, k in enumerate(keys):  # the holder still holds: each is deposited
            assert WidgetUpdate(cacher, k, doc={"c": i + 1}).end_session() is False
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        survivor = Process(url, namespace=ns, heartbeat_interval=0.1)
        survivor.register(WidgetUpdate)
        helpers.wait_for(
            lambda: len(out.read_bytes().splitlines()) >= 60, timeout_s=30, what="recovery"
        )
        helpers.wait_for(
            lambda: survivor.client.zcard(survivor.keys.processes) == 2,
            timeout_s=30,
            what="the dead process unregistered",
        )
        assert read_executed(out) == {k: i + 1 for i, k in enumerate(keys)}
        assert len(out.read_bytes().splitlines()) == 60  # once each
    finally:
        cacher.stop()
        if survivor is not None:
            survivor.stop()
    assert namespace_keys(redis_cluster, ns) == []


def test_a_slot_migrated_during_a_run_keeps_totals_exact(
    redis_cluster, cluster_namespace, config, db, tmp_path, helpers
) -> None:
    ns = cluster_namespace
    data, expected = make_events(keys=200, count=8000, seed=5)
    lines = data.splitlines(keepends=True)
    workers = [
        subprocess.Popen(
            [
                *worker_command(redis_cluster, ns, helpers),
                "run",
                "-c",
                str(config),
                "--max-entries",
                "15",
                "--dead-letter",
                str(tmp_path / f"dead{i}.jsonl"),
            ],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    fed = threading.Event()

    def feed() -> None:
        for start in range(0, len(lines), 200):
            for i, w in enumerate(workers):
                assert w.stdin is not None
                w.stdin.write(b"".join(lines[start + i : start + 200 : 2]))
                w.stdin.flush()
        fed.set()

    c = redis_cluster.client()
    slots = sorted({c.keyslot(f"{ns}:ref:{{k{i}}}:nodes") for i in range(10)})
    c.close()
    feeder = threading.Thread(target=feed)
    feeder.start()
    owners = {slot: redis_cluster.owner(slot).port for slot in slots}
    try:
        for slot in slots:
            others = [n for n in redis_cluster.primaries() if n != redis_cluster.owner(slot)]
            redis_cluster.migrate_slot(slot, others[0])
        assert all(redis_cluster.owner(slot).port != owners[slot] for slot in slots)
        feeder.join(timeout=60)
        assert fed.is_set()
    finally:
        outputs = [w.communicate(timeout=60)[1] for w in workers]
    for w, err in zip(workers, outputs):
        assert w.returncode == 0, err.decode()
    assert totals(db) == expected
    assert namespace_keys(redis_cluster, ns) == []


def test_cluster_mode_against_a_plain_server_and_back_is_a_clear_error(
    redis_cluster, cluster_namespace, tmp_path
) -> None:
    plain = rediscluster.plain_server(tmp_path / "plain")
    try:
        code, _, err = cli(plain.url, cluster_namespace, "status", cluster=False)
        assert code == 0, err
        code, _, err = cli(plain.url, cluster_namespace, "status", cluster=True)
        assert code == 3
        assert f"redis at {plain.url} is not a cluster node" in err
        assert "Traceback" not in err
    finally:
        plain.kill()
    code, _, err = cli(redis_cluster.url, cluster_namespace, "status", cluster=False)
    assert code == 3
    assert f"redis at {redis_cluster.url} is a cluster node: run with --redis-cluster" in err
    assert "Traceback" not in err


def test_cluster_with_the_embedded_server_is_a_usage_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PHONON_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PHONON_REDIS_URL", raising=False)
    result = CliRunner().invoke(main, ["--redis-cluster", "status"])
    assert result.exit_code == 3
    assert "--redis-cluster needs the URL of a cluster node" in result.stderr


def test_config_store_cluster_selects_the_cluster(
    redis_cluster, cluster_namespace, tmp_path, db
) -> None:
    path = tmp_path / "c.toml"
    body = CONFIG.replace("DB", str(db))
    path.write_text(f'[store]\nurl = "{redis_cluster.url}"\ncluster = true\n{body}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHONON_REDIS")}
    run = subprocess.run(
        [sys.executable, "-m", "phonon_cli", "--namespace", cluster_namespace, "run", "-c", path],
        input=b'{"k": "a", "n": 2}\n',
        capture_output=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr.decode()
    assert totals(db) == {"a": 2}
    path.write_text(f'[store]\nurl = "{redis_cluster.url}"\ncluster = "yes"\n{body}')
    result = CliRunner().invoke(main, ["check", "-c", str(path)])
    assert result.exit_code == 2
    assert "store.cluster" in result.stderr


def test_a_process_declared_dead_applies_nothing_on_any_node(
    redis_cluster, cluster_namespace
) -> None:
    url, ns = redis_cluster.url, cluster_namespace
    zombie = Process(url, namespace=ns, cluster=True, start_heartbeat=False)
    survivor = Process(url, namespace=ns, cluster=True, start_heartbeat=False)
    try:
        resources = [f"z{i}" for i in range(30)]
        acquire_many(zombie, resources)
        acquire_many(survivor, resources)
        zombie.client.delete(zombie.keys.alive(zombie.id))  # silent past its TTL
        assert declare_dead(survivor, [zombie.id]) == [zombie.id]
        with pytest.raises(Fenced):
            release_many(zombie, [Release(r, "end", "sums", "", "n\t5\n") for r in resources])
        with pytest.raises(Fenced):
            acquire_many(zombie, ["late"])
        c = redis_cluster.client()
        try:
            partials = [c.exists(survivor.keys.resource(r).partials) for r in resources]
            late = c.hgetall(survivor.keys.resource("late").nodes)
        finally:
            c.close()
        assert partials == [0] * 30  # no deposit landed, on any master
        assert late == {}
    finally:
        survivor.stop()
        zombie.stop()


@pytest.fixture(scope="module")
def replicated_cluster(redis_cluster, tmp_path_factory) -> Iterator[rediscluster.Cluster]:
    """3 masters with a replica each; its own, as a test kills one of its masters.
    (It needs what ``redis_cluster`` needs, which skips, or under CI=true fails.)"""
    cluster = rediscluster.Cluster(tmp_path_factory.mktemp("replicated"), masters=3, replicas=1)
    yield cluster.start()
    cluster.stop()


def test_a_master_failing_over_to_its_replica_mid_run_loses_nothing_replicated(
    replicated_cluster, config, db, tmp_path, helpers
) -> None:
    """What docs/scaling.md promises: writes a replica has received survive its
    promotion, and the run goes on through the failover (MOVED, reconnects)."""
    cluster = replicated_cluster
    ns = f"phonon-test-{os.getpid()}"
    worker = subprocess.Popen(
        [
            *helpers.phonon_command(cluster.url, ns)[:-2],
            "--heartbeat-interval",
            "1",
            "--redis-cluster",
            "run",
            "-c",
            str(config),
            "--max-entries",
            "20",
            "--dead-letter",
            str(tmp_path / "dead.jsonl"),
        ],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    data, expected = make_events(keys=300, count=4000, seed=9)
    lines = data.splitlines(keepends=True)
    c = cluster.client()
    # the master of the namespace's own keys (registry, held sets): the hardest one to lose
    victim = cluster.owner(c.keyslot(Keys(ns).processes))
    try:
        assert worker.stdin is not None
        worker.stdin.write(b"".join(lines[:2000]))
        worker.stdin.flush()

        def read(n: int) -> bool:
            procs = [p for p in c.zrange(Keys(ns).processes, 0, -1)]
            return any(int(c.hget(Keys(ns).process(p), "events_read") or 0) == n for p in procs)

        helpers.wait_for(lambda: read(2000), timeout_s=60, what="the first half read")
        v = victim.client()
        v.set(f"sync:{{{ns}}}", 1)  # the same slot as the namespace's own keys
        assert v.execute_command("WAIT", 1, 5000) == 1  # everything before is on the replica
        v.close()
        victim.kill()
        helpers.wait_for(
            lambda: victim.port not in {n.port for n in cluster.primaries()} and cluster.is_ready(),
            timeout_s=30,
            what="a replica promoted",
        )
        worker.stdin.write(b"".join(lines[2000:]))
        worker.stdin.flush()
    finally:
        _, err = worker.communicate(timeout=120)
        c.close()
    assert worker.returncode == 0, err.decode()
    assert totals(db) == expected
    assert namespace_keys(cluster, ns) == []


def test_quarantine_across_masters_and_listed_from_every_one(
    redis_cluster, cluster_namespace
) -> None:
    from phonon_cli.core.quarantine import Poisoned, quarantine

    url, ns = redis_cluster.url, cluster_namespace
    resources = [f"q{i}" for i in range(12)]
    assert len(masters_of(redis_cluster, ns, resources)) >= 2
    p = Process(url, namespace=ns, cluster=True, start_heartbeat=False)
    try:
        acquire_many(p, resources)
        quarantine(
            p,
            [
                Poisoned(r, "sums", "{}", "n\t1\n", "poison", p.keys.resource(r).executing(p.id, i))
                for i, r in enumerate(resources)
            ],
        )
        code, out, err = cli(url, ns, "quarantine", "list")
        assert code == 0, err
        assert all(r in out for r in resources)
        assert "12 quarantined" in err
    finally:
        p.stop()


@pytest.mark.parametrize("update", ["WidgetUpdate", "CountingUpdate"])
def test_a_batch_whose_reply_was_lost_is_applied_once_on_every_node(
    redis_cluster, cluster_namespace, tmp_path, monkeypatch, update
) -> None:
    """As on one server (test_faults): Redis ran a batch, here one call per slot on
    three masters, and the reply was lost; the batch is sent again and each per-slot
    call is recognised in its own slot, so deposits and takes apply once."""
    import widgets

    from phonon_cli import faults
    from phonon_cli.core.update import end_sessions

    url, ns = redis_cluster.url, cluster_namespace
    out = tmp_path / "out.jsonl"
    out.touch()
    monkeypatch.setenv("PHONON_TEST_OUT", str(out))
    cls = getattr(widgets, update)
    keys = [f"k{i}" for i in range(12)]
    assert len(masters_of(redis_cluster, ns, keys)) == 3
    a = Process(url, namespace=ns, cluster=True, start_heartbeat=False)
    b = Process(url, namespace=ns, cluster=True, start_heartbeat=False)
    try:
        held = [cls(b, k, doc={"c": 1}) for k in keys]
        mine = [cls(a, k, doc={"c": 10}) for k in keys]
        faults.plan("lost-reply:drop")
        try:
            assert end_sessions(mine) == [False] * 12  # deposited (b holds), reply lost
            faults.plan("lost-reply:drop")
            assert end_sessions(held) == [True] * 12  # b takes a's partials, reply lost
        finally:
            faults.plan("")
        assert read_executed(out) == Counter({k: 11 for k in keys})
    finally:
        a.stop()
        b.stop()
    assert namespace_keys(redis_cluster, ns) == []


def test_kill_9_on_a_file_source_counts_every_event_once_on_a_cluster(
    redis_cluster, cluster_namespace, config, db, tmp_path, helpers
) -> None:
    """As test_faults' kill -9 test, on three masters: a worker on a ``file:``
    partition with a tiny cache is killed just before or after a write, round after
    round; after a last run and a flush every event is counted once. The replay
    check needs the partition's highest mark, which lives in the namespace's slot,
    not in the slots of the keys whose deposits make it."""
    rng = random.Random(7)
    data, expected = make_events(keys=40, count=2000, seed=7)
    topic = tmp_path / "topic.jsonl"
    topic.write_bytes(data)
    command = [*worker_command(redis_cluster, cluster_namespace, helpers), "run", "-c"]
    command += [str(config), "--source", f"file:{topic}", "--max-entries", "5"]
    for _ in range(4):
        point = rng.choice(["before-execute", "after-execute"])
        fault = f"{point}@loop:kill:{rng.randint(1, 8)}"
        run = subprocess.run(
            command, capture_output=True, timeout=120, env={**os.environ, "PHONON_FAULT": fault}
        )
        assert run.returncode in (0, -signal.SIGKILL), run.stderr.decode()
    keys, c = Keys(cluster_namespace), redis_cluster.client()
    try:  # the killed ones count as dead, so the last run and the flush recover them
        helpers.wait_for(
            lambda: not any(c.exists(keys.alive(p)) for p in c.zrange(keys.processes, 0, -1)),
            what="every killed worker dead",
        )
    finally:
        c.close()
    run = subprocess.run(command, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()
    flush = [*worker_command(redis_cluster, cluster_namespace, helpers), "flush", "--all"]
    flushed = subprocess.run([*flush, "-c", str(config)], capture_output=True, timeout=60)
    assert flushed.returncode == 0, flushed.stderr.decode()
    assert totals(db) == expected


def test_a_key_released_and_taken_again_in_one_batch_stays_in_the_held_set(
    redis_cluster, cluster_namespace
) -> None:
    """The held set is what recovery visits when a process dies. A key that left the
    cache and came back within one batch is released, then acquired again: it is
    held, so it must stay in the held set, whose removals on a cluster are sent
    after the batch (it was removed, and a worker killed later left its name on
    the key's nodelist for good, the partial never written)."""
    p = Process(redis_cluster.url, namespace=cluster_namespace, cluster=True, start_heartbeat=False)
    try:
        acquire_many(p, ["back", "gone"])
        release_many(
            p, [Release(r, "end", "sums", "", "n\t1\n") for r in ("back", "gone")], acquire=["back"]
        )
        assert p.held_resources() == {"back"}
        assert p.holders_by_resource(["back"])["back"] == [p.id]
    finally:
        p.stop()
    assert namespace_keys(redis_cluster, cluster_namespace) == []


def test_kill_9_on_a_stream_counts_every_entry_once_on_a_cluster(
    redis_cluster, cluster_namespace, config, db, tmp_path, helpers
) -> None:
    """As test_faults' stream kill -9 test, on three masters: each next worker claims
    the killed ones' pending entries. The claim (listed and claimed in one script)
    holds the stream's key only; the lineage and the registry live in other slots,
    so the lineage is written just before and the fence is not checked there."""
    rng = random.Random(11)
    data, expected = make_events(keys=30, count=1500, seed=11)
    stream = f"{cluster_namespace}-stream"
    keys, c = Keys(cluster_namespace), redis_cluster.client()
    assert c.keyslot(stream) != c.keyslot(keys.processes)
    for line in data.splitlines():
        c.xadd(stream, {"data": line})
    # -v: each run says what it claimed (INFO)
    command = [*worker_command(redis_cluster, cluster_namespace, helpers), "-v", "run", "-c"]
    command += [str(config), "--source", f"redis-stream:{stream}", "--max-entries", "5"]

    def all_dead() -> bool:
        return not any(c.exists(keys.alive(p)) for p in c.zrange(keys.processes, 0, -1))

    killed = claimed = 0
    try:
        for _ in range(4):
            helpers.wait_for(all_dead, what="the killed one dead")
            point = rng.choice(["before-execute", "after-execute"])
            fault = f"{point}@loop:kill:{rng.randint(1, 2)}"
            run = subprocess.run(
                command, capture_output=True, timeout=120, env={**os.environ, "PHONON_FAULT": fault}
            )
            assert run.returncode in (0, -signal.SIGKILL), run.stderr.decode()
            killed += run.returncode == -signal.SIGKILL
            claimed += b"claimed" in run.stderr
        assert killed >= 2 and claimed >= 1, (killed, claimed)
        helpers.wait_for(all_dead, what="every killed worker dead")
        run = subprocess.run(command, capture_output=True, timeout=120)
        assert run.returncode == 0, run.stderr.decode()
        flush = [*worker_command(redis_cluster, cluster_namespace, helpers), "flush", "--all"]
        flushed = subprocess.run([*flush, "-c", str(config)], capture_output=True, timeout=60)
        assert flushed.returncode == 0, flushed.stderr.decode()
        assert c.xpending(stream, "phonon")["pending"] == 0
        assert totals(db) == expected
    finally:
        c.delete(stream)
        c.close()
