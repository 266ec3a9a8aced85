from __future__ import annotations

import orjson
import pytest
from widgets import CountingUpdate, SeenUpdate, WidgetUpdate

from phonon_cli import Process, Update
from phonon_cli.core.update import end_sessions


@pytest.fixture(autouse=True)
def out_file(tmp_path, monkeypatch):
    path = tmp_path / "executed.jsonl"
    path.touch()
    monkeypatch.setenv("PHONON_TEST_OUT", str(path))
    return path


def executed(path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.mark.parametrize("cls", [WidgetUpdate, CountingUpdate])
def test_last_holder_executes_everything_once(make_process, out_file, cls, client, helpers) -> None:
    ps = [make_process() for _ in range(3)]
    ups = [cls(p, "1.2", collection="w", doc={"clicks": i + 1}) for i, p in enumerate(ps)]
    assert [u.end_session() for u in ups] == [False, False, True]
    assert executed(out_file) == [
        {"resource": "w:1.2", "doc": {"clicks": 6}, "pid": executed(out_file)[0]["pid"]}
    ]
    for p in ps:
        p.stop()
    assert helpers.namespace_keys(client, ps[0].keys.namespace) == []


def test_state_round_trips_as_json(make_process, out_file, client) -> None:
    p1, p2 = make_process(), make_process()
    a = SeenUpdate(p1, "k", doc={"n": 1})
    a.seen = ["x"]
    b = SeenUpdate(p2, "k", doc={"n": 2})
    b.seen = ["y"]
    assert a.end_session() is False
    stored = client.lrange(p1.keys.resource("k").partials, 0, -1)
    assert [orjson.loads(s) for s in stored] == [{"doc": {"n": 1}, "state": {"seen": ["x"]}}]
    assert b.end_session() is True
    assert b.seen == ["x", "y"] and b.doc == {"n": 3}


def test_conflict_free_partials_sum_inside_redis(make_process, client) -> None:
    ps = [make_process() for _ in range(3)]
    ups = [CountingUpdate(p, "k", doc={"clicks": 2, "ratio": 0.5}) for p in ps]
    ups[0].end_session()
    ups[1].end_session()
    assert client.hgetall(ps[0].keys.resource("k").partials) == {"clicks": "4", "ratio": "1"}
    assert ups[2].end_session() is True
    assert ups[2].doc == {"clicks": 6, "ratio": 1.5}


def test_one_round_trip_per_eviction(make_process, round_trips) -> None:
    p1, p2 = make_process(start_heartbeat=False), make_process(start_heartbeat=False)
    for cls in (WidgetUpdate, CountingUpdate):
        a = cls(p1, f"rt-{cls.__name__}", doc={"c": 1})
        b = cls(p2, f"rt-{cls.__name__}", doc={"c": 1})
        with round_trips(p1) as cached:
            assert a.end_session() is False
        assert cached == [1], cls
        with round_trips(p2) as last:
            assert b.end_session() is True
        # leave-and-take, then forget the taken partials once written
        assert last == [2], cls


def test_batched_end_sessions_is_one_call(make_process, round_trips, out_file) -> None:
    p1, p2 = make_process(start_heartbeat=False), make_process(start_heartbeat=False)
    first = [CountingUpdate(p1, f"k{i}", doc={"c": 1}) for i in range(500)]
    second = [CountingUpdate(p2, f"k{i}", doc={"c": 2}) for i in range(500)]
    with round_trips(p1) as n:
        assert end_sessions(first) == [False] * 500
    assert n == [1]
    with round_trips(p2) as n:
        assert end_sessions(second) == [True] * 500
    assert n == [2]
    assert sorted(r["doc"]["c"] for r in executed(out_file)) == [3] * 500


def test_force_expiry_executes_while_others_hold(make_process, out_file) -> None:
    p1, p2 = make_process(), make_process()
    a = WidgetUpdate(p1, "f", doc={"c": 1})
    b = WidgetUpdate(p2, "f", doc={"c": 10})
    assert a.force_expiry() is True
    assert b.end_session() is True  # b is now last: executes only its own
    assert [r["doc"] for r in executed(out_file)] == [{"c": 1}, {"c": 10}]


def test_sessions_expire_by_injected_clock(make_process) -> None:
    now = [1_000_000]
    p = make_process(clock=lambda: now[0])
    u = WidgetUpdate(p, "s", doc={"c": 1}, soft_session=10, hard_session=60)
    assert not u.is_expired()
    now[0] += 9_000
    u.refresh(WidgetUpdate(p, "s", doc={"c": 1}, acquire=False))
    now[0] += 9_000
    assert not u.is_expired()  # soft session renewed by the merge
    now[0] += 1_000
    assert u.is_expired()
    v = WidgetUpdate(p, "h", soft_session=None, hard_session=5)
    now[0] += 4_999
    assert not v.is_expired()
    now[0] += 1
    assert v.is_expired()


def test_init_cache_takes_cached_partials(make_process, client) -> None:
    p1, p2 = make_process(), make_process()
    a = WidgetUpdate(p1, "ic", doc={"c": 5})
    WidgetUpdate(p2, "ic", doc={})  # p2 holds it, so a caches
    assert a.end_session() is False
    c = WidgetUpdate(p1, "ic", doc={"c": 1}, init_cache=True)
    assert c.doc == {"c": 6}
    assert not client.exists(p1.keys.resource("ic").partials)


class Failing(Update):
    execute_attempts = 2
    execute_backoff_s = 0.0
    calls = 0

    def merge(self, other: Update) -> None:
        self.doc["c"] = self.doc.get("c", 0) + other.doc.get("c", 0)

    def execute(self) -> None:
        Failing.calls += 1
        raise ConnectionError("database is down")


def test_failing_execute_is_retried_then_cached_back(make_process, client, monkeypatch) -> None:
    monkeypatch.setattr(Failing, "calls", 0)
    p: Process = make_process()
    u = Failing(p, "down", doc={"c": 7})
    assert u.end_session() is False
    assert Failing.calls == 2
    assert isinstance(u.error, ConnectionError)
    keys = p.keys.resource("down")
    assert [orjson.loads(x)["doc"] for x in client.lrange(keys.partials, 0, -1)] == [{"c": 7}]
    assert client.hexists(keys.meta, "recipe")
    assert client.hlen(keys.nodes) == 0  # orphaned, waiting for flush or the next holder


def test_unknown_class_is_never_imported_from_redis(make_process, client) -> None:
    p1 = make_process()
    u = WidgetUpdate(p1, "evil", doc={"c": 1})
    u.cache()
    meta = p1.keys.resource("evil").meta
    client.hset(meta, "recipe", orjson.dumps({"cls": "os:system", "id": "x"}).decode())
    p2 = make_process()
    from phonon_cli.core.recovery import claim_orphans

    assert claim_orphans(p2, ["evil"]) == ([], ["evil"])
    assert client.exists(p1.keys.resource("evil").partials)
