from __future__ import annotations

from phonon_cli import Process


def test_count_and_last_holder(make_process) -> None:
    p1, p2, p3 = make_process(), make_process(), make_process()
    refs = [p.create_reference("me") for p in (p1, p2, p3)]
    assert refs[0].count() == 3
    calls: list[str] = []
    assert refs[0].dereference(calls.append, args=["p1"]) is False
    assert refs[1].dereference(calls.append, args=["p2"]) is False
    assert refs[2].count() == 1
    assert refs[2].dereference(calls.append, args=["p3"]) is True
    assert calls == ["p3"]


def test_count_ignores_dead_holders(make_process, client, namespace) -> None:
    p1, p2 = make_process(), make_process()
    r1 = p1.create_reference("r")
    p2.create_reference("r")
    client.delete(p2.keys.alive(p2.id))  # p2's heartbeat lapsed
    assert r1.count() == 1


def test_times_modified(make_process) -> None:
    ref = make_process().create_reference("tm")
    assert ref.get_times_modified() == 0
    ref.increment_times_modified()
    ref.increment_times_modified()
    assert ref.get_times_modified() == 2


def test_force_expiry_runs_callback_while_others_hold(make_process) -> None:
    p1, p2 = make_process(), make_process()
    r1 = p1.create_reference("f")
    r2 = p2.create_reference("f")
    r1.force_expiry = True
    assert r1.dereference(lambda: None) is True
    assert r2.count() == 1


def test_create_reference_is_one_round_trip(make_process, round_trips) -> None:
    p: Process = make_process(start_heartbeat=False)
    with round_trips(p) as counted:
        p.create_reference("rt")
    assert counted == [1]
