"""Fault points for tests: make a real worker stop or die at a chosen moment.

``PHONON_FAULT=POINT:ACTION[:N][,...]`` fires ACTION the N-th time (default the
first) the worker reaches POINT. Actions: ``stop`` (SIGSTOP itself, like a long GC
pause or a frozen VM: a test sends SIGCONT), ``kill`` (SIGKILL itself) and ``drop``
(raise a ConnectionError, as a dropped connection would). Points: ``before-execute``
(partials taken, nothing written yet), ``after-execute`` (written, the taken
partials not yet forgotten in Redis), ``in-recovery`` (holding the recovery lock,
nothing recovered yet), ``lost-reply`` (a pipeline ran in Redis and its reply is
about to be returned) and ``before-claim`` (a stream reader holding the claim lock,
about to claim a dead consumer's pending entries), ``before-orphans`` (a recovery
that let go of the recovery lock, about to write what it adopted and claim the
orphans it found). A point named ``POINT@loop`` counts only what the main thread
(the run loop) reaches while the process is not recovering (``recovering``: taking
or holding the recovery lock, then writing what it adopted): a test can then kill a
worker mid-write many times without ever killing it while it recovers.
Unset, each point costs one truth test per batch.
"""

from __future__ import annotations

import os
import signal
import threading

_plan: dict[str, tuple[str, int]] = {}
_seen: dict[str, int] = {}
_recovering = 0
"""Recoveries of this process (its recovery thread, its main thread) under way right
now (``recovering``)."""
_recovering_mutex = threading.Lock()


def recovering(start: bool) -> None:
    """A recovery starts taking the recovery lock (True) or is over, the lock let go
    and what it adopted written (False)."""
    global _recovering
    with _recovering_mutex:
        _recovering += 1 if start else -1


def plan(spec: str) -> None:
    """Replace the planned faults (``PHONON_FAULT``'s syntax; "" for none)."""
    _plan.clear()
    _seen.clear()
    for item in filter(None, spec.split(",")):
        where, action, *n = item.split(":")
        _plan[where] = (action, int(n[0]) if n else 1)


plan(os.environ.get("PHONON_FAULT", ""))


def point(name: str) -> None:
    """Fire the fault planned for ``name``, if any and if its turn has come."""
    if not _plan:
        return
    if name not in _plan:
        name += "@loop"
        if name not in _plan or threading.current_thread() is not threading.main_thread():
            return
        if _recovering:
            return
    action, nth = _plan[name]
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] != nth:
        return
    if action == "drop":
        import redis

        raise redis.ConnectionError(f"fault injected at {name}")
    # To this thread, not the process: a signal sent to the process is taken by its
    # main thread, and this one (a source's reading thread, say) could run on for a
    # moment, past the point, before the whole process stops or dies.
    signal.pthread_kill(
        threading.get_ident(), signal.SIGSTOP if action == "stop" else signal.SIGKILL
    )
