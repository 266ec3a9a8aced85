"""``phonon flush``: running workers expire on request; orphaned partials are claimed once."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from phonon_cli.cli import main
from phonon_cli.ops.flush import FlushSubscription, matcher
from phonon_cli.sinks.sql import Counter

CONFIG = """
[[routes]]
when = { kind = ["w"] }
update = "phonon_cli.sinks.sql:Counter"
id = "{k}"
collection = "widgets"
database = "sqlite:///DB"
spec = { k = "{k}" }
doc = { n = "{n}" }

[[routes]]
when = { kind = ["g"] }
update = "phonon_cli.sinks.sql:Counter"
id = "{k}"
collection = "gadgets"
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


def cli(redis_url: str, namespace: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["--redis-url", redis_url, "--namespace", namespace, *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def status(redis_url: str, namespace: str) -> dict:
    code, out, _ = cli(redis_url, namespace, "status", "--json")
    assert code == 0
    return orjson.loads(out)


def totals(db: Path, table: str) -> dict[str, int]:
    if not db.exists():
        return {}
    with sqlite3.connect(db) as conn:
        try:
            return dict(conn.execute(f"SELECT k, n FROM {table}").fetchall())
        except sqlite3.OperationalError:  # no such table: nothing executed yet
            return {}


class Worker:
    """A real ``phonon run`` reading events from our pipe; it runs until the pipe closes."""

    def __init__(
        self, redis_url: str, namespace: str, config: Path, tmp_path: Path, helpers: object
    ) -> None:
        self.redis_url, self.namespace = redis_url, namespace
        self.sent = 0
        self.proc = helpers.start_worker(  # type: ignore[attr-defined]
            redis_url,
            namespace,
            config,
            "--dead-letter",
            str(tmp_path / "dead.jsonl"),
            cwd=tmp_path,
        )

    def send(self, events: list[dict], helpers: object) -> str:
        """Write events; return the worker's id once status shows it has read them all."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"".join(orjson.dumps(e) + b"\n" for e in events))
        self.proc.stdin.flush()
        self.sent += len(events)

        def read_all() -> str | None:
            for p in status(self.redis_url, self.namespace)["processes"]:
                if p["pid"] == self.proc.pid and p["events_read"] == self.sent:
                    return str(p["id"])
            return None

        return str(helpers.wait_for(read_all, what="the worker to read every event"))  # type: ignore[attr-defined]

    def finish(self) -> None:
        _, err = self.proc.communicate(timeout=20)
        assert self.proc.returncode == 0, err.decode()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=20)


def events(kind: str, counts: dict[str, int]) -> list[dict]:
    return [{"kind": kind, "k": k, "n": 1} for k, n in counts.items() for _ in range(n)]


def test_flush_all_wait_executes_everything_while_the_worker_runs(
    redis_url, namespace, config, db, tmp_path, helpers, client
) -> None:
    w = Worker(redis_url, namespace, config, tmp_path, helpers)
    try:
        wid = w.send(events("w", {"a": 5, "b": 3, "c": 1}), helpers)
        assert totals(db, "widgets") == {}  # sessions are long: nothing written yet
        code, _, err = cli(redis_url, namespace, "flush", "--all", "--wait")
        assert code == 0, err
        assert "1 worker(s) expired 3 entries" in err
        assert w.proc.poll() is None  # still running
        assert totals(db, "widgets") == {"a": 5, "b": 3, "c": 1}
        report = status(redis_url, namespace)
        assert report["references"] == [] and report["processes"][0]["id"] == wid
        w.send(events("w", {"a": 2, "d": 4}), helpers)
    finally:
        w.finish()
    assert totals(db, "widgets") == {"a": 7, "b": 3, "c": 1, "d": 4}  # nothing twice
    assert helpers.namespace_keys(client, namespace) == []


def test_flush_by_glob_touches_only_matching_keys(
    redis_url, namespace, config, db, tmp_path, helpers
) -> None:
    w = Worker(redis_url, namespace, config, tmp_path, helpers)
    try:
        w.send(events("w", {"a": 2, "b": 1}) + events("g", {"a": 4}), helpers)
        code, _, err = cli(redis_url, namespace, "flush", "widgets:*", "--wait")
        assert code == 0, err
        assert "expired 2 entries" in err
        assert totals(db, "widgets") == {"a": 2, "b": 1}
        assert totals(db, "gadgets") == {}
        held = [r["resource"] for r in status(redis_url, namespace)["references"]]
        assert held == ["gadgets:a"]
        code, _, err = cli(redis_url, namespace, "flush", "gadgets:a", "widgets:none", "--wait")
        assert code == 0 and "expired 1 entries" in err
        assert totals(db, "gadgets") == {"a": 4}
    finally:
        w.finish()
    assert totals(db, "widgets") == {"a": 2, "b": 1} and totals(db, "gadgets") == {"a": 4}


def test_killed_worker_is_dead_and_flush_c_executes_its_orphans(
    redis_url, namespace, config, db, tmp_path, helpers, make_process, client
) -> None:
    w = Worker(redis_url, namespace, config, tmp_path, helpers)
    wid = w.send(events("w", {"a": 3}), helpers)
    # Another process ends its session for the same key while the worker holds it:
    # its partial is cached in redis for the worker to execute ...
    other = make_process()
    part = Counter(
        other, "a", database=f"sqlite:///{db}", collection="widgets", spec={"k": "a"}, doc={"n": 5}
    )
    assert part.end_session() is False
    other.stop()
    w.kill()  # ... and the worker dies: its 3 events were only in its memory.

    def dead() -> dict | None:
        r = status(redis_url, namespace)
        ok = [p["alive"] for p in r["processes"]] == [False] and r["totals"]["orphaned"] == 1
        return r if ok else None

    report = helpers.wait_for(dead, what="the killed worker to show as dead")
    (ref,) = report["references"]
    assert ref["resource"] == "widgets:a" and ref["dead_holders"] == [wid] and ref["orphaned"]
    code, table, _ = cli(redis_url, namespace, "status")
    assert "dead" in table and "ORPHANED PARTIALS" in table

    code, out, err = cli(redis_url, namespace, "flush", "--all")  # no config: listed only
    assert code == 0 and out.splitlines() == ["widgets:a"] and "flush -c CONFIG" in err
    assert totals(db, "widgets") == {}
    code, out, err = cli(redis_url, namespace, "flush", "--all", "-c", str(config))
    assert code == 0, err
    assert "executed 1 orphaned partial(s)" in err and out == ""
    assert totals(db, "widgets") == {"a": 5}
    code, out, err = cli(redis_url, namespace, "flush", "--all", "-c", str(config))
    assert code == 0 and "executed 0 orphaned" in err  # never twice
    assert totals(db, "widgets") == {"a": 5}
    assert helpers.namespace_keys(client, namespace) == []


def test_library_orphan_listed_then_claimed_by_glob(
    redis_url, namespace, config, db, make_process, helpers, client
) -> None:
    p = make_process()
    for k, n in (("x", 4), ("y", 6)):
        Counter(
            p, k, database=f"sqlite:///{db}", collection="widgets", spec={"k": k}, doc={"n": n}
        ).cache()
    p.stop()
    code, out, _ = cli(redis_url, namespace, "flush", "widgets:x")
    assert code == 0 and out.splitlines() == ["widgets:x"]
    code, out, err = cli(redis_url, namespace, "flush", "widgets:x", "-c", str(config))
    assert code == 0 and "executed 1 orphaned" in err
    assert totals(db, "widgets") == {"x": 4}
    code, out, _ = cli(redis_url, namespace, "flush", "--all")
    assert out.splitlines() == ["widgets:y"]


def test_wait_names_workers_that_do_not_answer(redis_url, namespace, make_process, client) -> None:
    p = make_process()
    control = FlushSubscription(p)  # subscribed, but nobody polls it
    try:
        code, _, err = cli(redis_url, namespace, "flush", "--all", "--wait", "--timeout", "0.3")
        assert code == 1
        assert "did not answer within 0.3s" in err and p.id in err and "pid" in err
        (request,) = control.poll()
        assert request.matches("anything") and request.all
        request.ack(7)
        key = p.keys.flush_acks(request.id)
        assert client.hgetall(key) == {p.id: "7"} and client.ttl(key) > 0
    finally:
        control.close()


def test_library_processes_are_not_waited_for(redis_url, namespace, make_process) -> None:
    p = make_process()
    code, _, err = cli(redis_url, namespace, "flush", "--all", "--wait", "--timeout", "5")
    assert code == 0
    assert "sent to 0 running worker(s)" in err and p.id in err


def test_idle_poll_sends_nothing(make_process, round_trips, client, helpers) -> None:
    p = make_process(start_heartbeat=False)
    control = FlushSubscription(p)
    try:
        with round_trips(p) as sent:
            assert [control.poll() for _ in range(50)] == [[]] * 50
        assert sent[0] == 0
        client.publish(p.keys.control, b"not json")
        client.publish(p.keys.control, orjson.dumps({"id": "r1", "globs": ["widgets:*"]}))
        received: list = []
        helpers.wait_for(lambda: received.extend(control.poll()) or received, what="a request")
        (request,) = received
        assert request.id == "r1" and not request.all
        assert request.matches("widgets:1") and not request.matches("gadgets:1")
    finally:
        control.close()


def test_matcher_and_usage() -> None:
    m = matcher(["widgets:*", "gadgets:1.?"])
    assert m("widgets:a") and m("gadgets:1.2") and not m("gadgets:1.22") and not m("Widgets:a")
    assert matcher([], all_=True)("anything") and not matcher([])("anything")
    result = CliRunner().invoke(main, ["flush"])
    assert result.exit_code == 2 and "--all" in result.output


@pytest.mark.slow
def test_a_worker_that_started_over_under_a_new_id_still_answers_flush_wait(
    redis_url, namespace, config, db, tmp_path, helpers, client
) -> None:
    """A worker paused past its TTL is declared dead and starts over under a new id
    (fenced): ``flush --wait`` must find it under that id, wait for its answer, and
    its cached keys (never deposited) are written once."""
    from phonon_cli.store.keys import Keys

    w = Worker(redis_url, namespace, config, tmp_path, helpers)
    survivor = Worker(redis_url, namespace, config, tmp_path / "..", helpers)
    processes = Keys(namespace).processes
    try:
        old = w.send(events("w", {"a": 2, "b": 1}), helpers)
        helpers.wait_for(lambda: client.zcard(processes) == 2, what="both workers up")
        w.proc.send_signal(signal.SIGSTOP)
        helpers.wait_for(
            lambda: old not in client.zrange(processes, 0, -1), what="the paused one declared dead"
        )
        w.proc.send_signal(signal.SIGCONT)

        def started_over() -> bool:
            mine = [p for p in status(redis_url, namespace)["processes"] if p["pid"] == w.proc.pid]
            return any(p["id"] != old and p["alive"] for p in mine)

        helpers.wait_for(started_over, what="the worker to start over under a new id")
        code, _, err = cli(redis_url, namespace, "flush", "--all", "--wait")
        assert code == 0, err
        assert "2 worker(s) expired 2 entries" in err
        assert totals(db, "widgets") == {"a": 2, "b": 1}
    finally:
        w.proc.send_signal(signal.SIGCONT)
        w.finish()
        survivor.finish()
    assert totals(db, "widgets") == {"a": 2, "b": 1}


@pytest.mark.parametrize("answers_as", ["old id", "new id"])
def test_flush_wait_follows_a_worker_that_started_over(make_process, client, answers_as) -> None:
    """The request went out to a worker that was then declared dead and started over
    under a new id before answering: flush waits for it under the new id (it used to
    count it as gone and stop waiting), and takes its answer under either id."""
    from phonon_cli.core import recovery
    from phonon_cli.ops.flush import FlushRequest, Ticket, wait_for_acks

    w = make_process(start_heartbeat=False, heartbeat_interval=3600)
    survivor = make_process(start_heartbeat=False, heartbeat_interval=3600)
    old = w.id
    ticket = Ticket(FlushRequest("r1", all=True), waiting=[old], deaf=[])
    client.delete(w.keys.alive(old))  # paused past its TTL
    assert recovery.declare_dead(survivor, [old]) == [old]
    assert w.heartbeat() is False
    w.reregister()
    assert wait_for_acks(client, w.keys, ticket, timeout_s=0.3).silent[0]["id"] == w.id
    answer = FlushRequest("r1", all=True, client=client, keys=w.keys)
    answer.process_id = old if answers_as == "old id" else w.id
    answer.ack(2)
    answers = wait_for_acks(client, w.keys, ticket, timeout_s=5)
    assert (answers.acked, answers.gone, answers.silent) == ({old: 2}, [], [])


@pytest.mark.slow
@pytest.mark.parametrize("with_survivor", [False, True])
def test_flush_wait_says_a_paused_worker_stopped_answering_not_that_it_exited(
    redis_url, namespace, config, db, tmp_path, helpers, client, with_survivor
) -> None:
    """A worker paused (SIGSTOP) while ``flush --wait`` waits for it outlives its alive
    key. flush said it "exited meanwhile" and exited 0, as for a worker that stopped
    cleanly and expired everything on its way out, though its cache was never
    flushed. It must say the worker stopped answering and counts as dead, and exit
    1; with a survivor, which declares it dead and recovers it (possibly between two
    of flush's polls), just the same. Resumed, the worker starts over and its events
    are written once."""
    w = Worker(redis_url, namespace, config, tmp_path, helpers)
    survivor = (
        Worker(redis_url, namespace, config, tmp_path / "..", helpers) if with_survivor else None
    )
    try:
        wid = w.send(events("w", {"a": 2, "b": 1}), helpers)
        helpers.wait_for(
            lambda: (
                sum(p["flushable"] for p in status(redis_url, namespace)["processes"])
                == 1 + with_survivor
            ),
            what="every worker listening",
        )
        w.proc.send_signal(signal.SIGSTOP)
        code, _, err = cli(redis_url, namespace, "flush", "--all", "--wait", "--timeout", "20")
        assert code == 1, err
        assert "exited meanwhile" not in err, err
        assert "stopped answering" in err and wid in err and str(w.proc.pid) in err, err
        assert f"{int(with_survivor)} worker(s) expired" in err, err
    finally:
        w.proc.send_signal(signal.SIGCONT)
        w.finish()
        if survivor is not None:
            survivor.finish()
    assert totals(db, "widgets") == {"a": 2, "b": 1}


def test_flush_wait_tells_a_worker_recovered_as_dead_from_one_that_exited(
    make_process, client
) -> None:
    """Between two of flush's polls a survivor may declare a silent worker dead and
    forget it whole (hash and all), as a worker that exits forgets itself: the mark
    the survivor leaves still says it died. One that stopped cleanly is gone."""
    from phonon_cli.ops.flush import FlushRequest, Ticket, wait_for_acks

    silent = make_process(start_heartbeat=False, heartbeat_interval=3600)
    leaving = make_process(start_heartbeat=False, heartbeat_interval=3600)
    survivor = make_process(start_heartbeat=False, heartbeat_interval=3600)
    survivor.register(Counter)
    ticket = Ticket(FlushRequest("r2", all=True), waiting=[silent.id, leaving.id], deaf=[])
    client.delete(silent.keys.alive(silent.id))  # paused past its TTL
    assert survivor.recover() == 1
    assert not client.exists(silent.keys.process(silent.id))  # forgotten whole
    leaving.stop()
    answers = wait_for_acks(client, silent.keys, ticket, timeout_s=5)
    assert answers.gone == [leaving.id]
    assert [p["id"] for p in answers.dead] == [silent.id]
