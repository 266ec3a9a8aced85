from __future__ import annotations

import threading
import time

import pytest

from phonon_cli import AlreadyLocked, LockNotOwned, Process
from phonon_cli.store.lock import Lock


def test_non_blocking_refusal(make_process) -> None:
    p1, p2 = make_process(), make_process()
    with p1.lock("job"):
        with pytest.raises(Process.AlreadyLocked):
            with p2.lock("job", block=False):
                pass
    with p2.lock("job", block=False) as lock:  # free again
        assert lock.owned


def test_contention_serialises_critical_sections(make_process, client, namespace) -> None:
    processes = [make_process() for _ in range(4)]
    counter = f"{namespace}:test:counter"

    def work(p: Process) -> None:
        for _ in range(25):
            with p.lock("counter", timeout_s=20):
                # A non-atomic read-modify-write: only correct under the lock.
                value = int(client.get(counter) or 0)
                client.set(counter, value + 1)

    threads = [threading.Thread(target=work, args=(p,)) for p in processes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert int(client.get(counter)) == 100


def test_blocking_times_out(make_process) -> None:
    p1, p2 = make_process(), make_process()
    with p1.lock("slow"):
        started = time.monotonic()
        with pytest.raises(AlreadyLocked):
            p2.lock("slow", timeout_s=0.2).acquire()
        assert time.monotonic() - started >= 0.2


def test_dead_owners_lock_expires(client, namespace) -> None:
    key = f"{namespace}:lock:{{dead}}"
    dead = Lock(client, key, ttl_ms=150)
    dead.acquire()  # and never released: its owner "died"
    waiter = Lock(client, key, timeout_s=5)
    started = time.monotonic()
    waiter.acquire()
    assert 0.1 <= time.monotonic() - started < 5
    waiter.release()


def test_only_the_owner_releases(client, namespace) -> None:
    key = f"{namespace}:lock:{{owned}}"
    first = Lock(client, key, ttl_ms=100)
    first.acquire()
    client.pexpire(key, 1)  # first's lock expires...
    time.sleep(0.01)
    second = Lock(client, key)
    second.acquire()  # ...and someone else takes it
    with pytest.raises(LockNotOwned):
        first.release()
    assert second.owned
    second.release()
    assert client.get(key) is None


def test_stop_releases_locks(make_process, client, namespace) -> None:
    p = make_process()
    lock = p.lock("held")
    lock.acquire()
    assert client.get(lock.key) == lock.token
    p.stop()
    assert client.get(lock.key) is None
