"""The invariant with real OS processes: exact totals, nothing left in Redis."""

from __future__ import annotations

import signal
from collections import Counter

import orjson
import pytest
from widgets import WidgetUpdate

from phonon_cli.core.reference import Release, release_many

pytestmark = pytest.mark.slow


def read(path) -> tuple[Counter, Counter, int]:
    put_in: Counter = Counter()
    executed: Counter = Counter()
    writes = 0
    for line in path.read_bytes().splitlines():
        record = orjson.loads(line)
        if "in" in record:
            for resource, doc in record["in"].items():
                for field, n in doc.items():
                    put_in[(resource, field)] += n
        else:
            writes += 1
            for field, n in record["doc"].items():
                executed[(record["resource"], field)] += n
    return put_in, executed, writes


@pytest.mark.parametrize("kind", ["json", "sums"])
def test_many_processes_small_caches_exact_totals(
    redis_url, namespace, kind, tmp_path, helpers, client
) -> None:
    out = tmp_path / "out.jsonl"
    out.touch()
    workers = [
        helpers.python_process(
            str(helpers.helpers_dir / "hammer.py"),
            redis_url,
            namespace,
            kind,
            "1500",
            "12",
            "4",
            str(seed),
            env={"PHONON_TEST_OUT": str(out)},
        )
        for seed in range(5)
    ]
    assert [w.wait(timeout=120) for w in workers] == [0] * 5
    put_in, executed, writes = read(out)
    assert sum(put_in.values()) > 0
    assert executed == put_in
    assert writes < 5 * 1500  # coordination saved writes
    assert helpers.namespace_keys(client, namespace) == []


def test_killed_holder_is_recovered_and_partials_executed_once(
    redis_url, namespace, tmp_path, helpers, client, make_process, monkeypatch
) -> None:
    out = tmp_path / "out.jsonl"
    out.touch()
    monkeypatch.setenv("PHONON_TEST_OUT", str(out))
    holder = helpers.python_process(
        str(helpers.helpers_dir / "holder.py"), redis_url, namespace, "10", stdout=-1
    )
    assert holder.stdout.readline().strip() == "ready"
    holder.stdout.close()
    cacher = make_process(recover_failed_processes=False)
    for i in range(10):
        assert WidgetUpdate(cacher, f"k{i}", doc={"c": 1}).end_session() is False
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    survivor = make_process(heartbeat_interval=0.1)
    survivor.register(WidgetUpdate)
    helpers.wait_for(lambda: len(out.read_bytes().splitlines()) >= 10, what="recovery")
    helpers.wait_for(
        lambda: client.zcard(survivor.keys.processes) == 2, what="the dead process unregistered"
    )
    _, executed, writes = read(out)
    assert writes == 10
    assert executed == Counter({(f"k{i}", "c"): 1 for i in range(10)})
    cacher.stop()
    survivor.stop()
    assert helpers.namespace_keys(client, namespace) == []


def test_partials_taken_by_a_process_that_dies_are_executed_by_a_survivor(
    make_process, client, tmp_path, monkeypatch, helpers
) -> None:
    out = tmp_path / "out.jsonl"
    out.touch()
    monkeypatch.setenv("PHONON_TEST_OUT", str(out))
    a = make_process(recover_failed_processes=False, start_heartbeat=False)
    b = make_process(recover_failed_processes=False)
    mine = WidgetUpdate(a, "x", doc={"c": 1})
    WidgetUpdate(b, "x", doc={"c": 2}).cache()  # b's partial is in redis
    # a is the last holder: it takes b's partial to execute... and dies before writing.
    (taken,) = release_many(a, [Release("x", "end", "json", mine.recipe(), mine.payload())])
    assert taken is not None and len(taken.items) == 1
    assert client.exists(*taken.exec_keys) == 2
    client.delete(a.keys.alive(a.id))
    survivor = make_process(recover_failed_processes=False)
    survivor.register(WidgetUpdate)
    assert survivor.recover() == 1
    # a's own doc went into the exec set with b's partial when a took it: the
    # survivor executes both, once, under the set's execution id.
    assert [orjson.loads(x)["doc"] for x in out.read_bytes().splitlines()] == [{"c": 3}]
    assert client.exists(*taken.exec_keys) == 0
    assert helpers.namespace_keys(client, a.keys.namespace) == sorted(
        [
            survivor.keys.alive(survivor.id),
            survivor.keys.process(survivor.id),
            b.keys.alive(b.id),
            b.keys.process(b.id),
            b.keys.replies(b.id),  # b's last batch reply, in case it was lost
            a.keys.processes,
        ]
    )
