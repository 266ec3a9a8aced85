"""Fault points for tests: make a real worker stop or die at a chosen moment.

``PHONON_FAULT=POINT:ACTION[:N][,...]`` fires ACTION the N-th time (default the
first) the worker reaches POINT. Actions: ``stop`` (SIGSTOP itself, like a long
GC pause or a frozen VM: a test sends SIGCONT) and ``kill`` (SIGKILL itself).
Points: ``before-execute`` (partials taken, nothing written yet) and
``after-execute`` (written, the taken partials not yet forgotten in Redis) and
``in-recovery`` (holding the recovery lock, nothing recovered yet).
Unset, each point costs one truth test per batch.
"""

from __future__ import annotations

import os
import signal

_plan: dict[str, tuple[str, int]] = {}
for _item in filter(None, os.environ.get("PHONON_FAULT", "").split(",")):
    _where, _action, *_n = _item.split(":")
    _plan[_where] = (_action, int(_n[0]) if _n else 1)
_seen: dict[str, int] = {}


def point(name: str) -> None:
    """Fire the fault planned for ``name``, if any and if its turn has come."""
    if not _plan or name not in _plan:
        return
    action, nth = _plan[name]
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] != nth:
        return
    os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)
