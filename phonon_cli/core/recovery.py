"""Recovery: what survivors do for processes that died holding references.

A dead process is removed from every nodelist it was on, partials it had taken
to execute are put back, and partials left with no holder are executed by a
survivor that knows their class (never a class named by data). Everything here
is idempotent, so a survivor that dies half way leaves work the next one redoes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import orjson

from .. import defaults
from ..exceptions import AlreadyLocked, LockNotOwned
from ..store import scripts
from ..store.keys import Keys
from ..store.lock import Lock
from .reference import Release, release_many
from .update import Update, execute_taken

if TYPE_CHECKING:
    from .process import Process

log = logging.getLogger(__name__)


def dead_processes(process: Process) -> list[str]:
    """Registered processes whose alive key has expired (never this one)."""
    registered = cast("list[str]", process.client.zrange(process.keys.processes, 0, -1))
    ids = [pid for pid in registered if pid != process.id]
    if not ids:
        return []
    pipe = process.client.pipeline(transaction=False)
    for pid in ids:
        pipe.exists(process.keys.alive(pid))
    return [pid for pid, alive in zip(ids, pipe.execute()) if not alive]


def recover(process: Process) -> int:
    """Clean up after every dead process; returns how many were recovered.

    Runs under a ``SET NX EX`` maintenance lock, so survivors take turns.
    For each dead process: remove it from every nodelist it was on, put back
    any partials it had taken to execute, then execute what is left with no
    live holder, where this process knows the partial's class.
    """
    dead = dead_processes(process)
    if not dead:
        return 0
    lock = Lock(
        process.client,
        process.keys.recovery_lock,
        block=False,
        ttl_ms=defaults.RECOVERY_LOCK_TTL_S * 1000,
    )
    try:
        lock.acquire()
    except AlreadyLocked:
        return 0
    try:
        orphans: list[str] = []
        for pid in dead:
            orphans.extend(release_all_of(process, pid))
        if orphans:
            claim_orphans(process, orphans)
        return len(dead)
    finally:
        try:
            lock.release()
        except LockNotOwned:
            log.warning("recovery took longer than its lock; another survivor may have helped")


def release_all_of(process: Process, pid: str, scan_executing: bool = True) -> list[str]:
    """Remove process ``pid`` from everything it held and unregister it; return
    resources left orphaned."""
    orphans = release_resources_of(process, pid, scan_executing)
    unregister(process, pid)
    return orphans


def unregister(process: Process, pid: str) -> None:
    """Forget process ``pid``: its registry entry, figures, held set and alive key."""
    pipe = process.client.pipeline(transaction=False)
    pipe.delete(process.keys.held(pid), process.keys.process(pid), process.keys.alive(pid))
    pipe.zrem(process.keys.processes, pid)
    pipe.execute()


def release_resources_of(process: Process, pid: str, scan_executing: bool = True) -> list[str]:
    """Remove process ``pid`` from every nodelist; return resources left orphaned.

    Idempotent, so a survivor that dies half way leaves work the next one can redo.

    Args:
        scan_executing: also SCAN for partials ``pid`` took to execute and never
            forgot (it died mid-write). A process stopping cleanly has none
            (it forgets them right after each write), so it skips the SCAN of
            the whole namespace.
    """
    resources = cast("set[str]", process.client.smembers(process.keys.held(pid)))
    entries: list[tuple[str, str, str]] = []
    for resource in resources:
        entries.append((resource, *process.keys.resource(resource).executing(pid, 0)))
    if scan_executing:
        pattern = process.keys.executing_pattern(pid)
        for key in process.client.scan_iter(match=pattern, count=1000):
            of = process.keys.resource_of(key)
            if of is not None and not Keys.is_recipe(key):
                entries.append((of, key, f"{key}:recipe"))
    orphans = []
    now = process.clock()
    for start in range(0, len(entries), defaults.BATCH_MAX_KEYS):
        chunk = entries[start : start + defaults.BATCH_MAX_KEYS]
        keys: list[str] = []
        for resource, exec_key, recipe_key in chunk:
            rk = process.keys.resource(resource)
            keys += [rk.nodes, rk.meta, rk.partials, exec_key, recipe_key]
        results = scripts.RECOVER(keys=keys, args=[pid, now], client=process.client)
        orphans += [r for (r, _, _), (left, cached) in zip(chunk, results) if not left and cached]
    if resources or entries:
        log.info("recovered process %s: released %d references", pid, len(entries))
    return sorted(set(orphans))


def rebuild(process: Process, recipe: str) -> Update | None:
    """An empty update from a recipe, if this process knows its class; never imports."""
    try:
        r = orjson.loads(recipe)
        cls = process.known_classes.get(r["cls"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if cls is None:
        return None
    update = cls(
        process,
        r["id"],
        database=r.get("database"),
        collection=r.get("collection"),
        spec=r.get("spec"),
        doc={},
        acquire=False,
    )
    update.clear()
    return update


def claim_orphans(process: Process, resources: Sequence[str]) -> tuple[list[str], list[str]]:
    """Execute partials that no process holds, where their class is known here.

    Returns (executed, left): ``left`` are those whose class this process does
    not know (they stay in Redis, visible to ``phonon status``) or that failed.
    """
    pipe = process.client.pipeline(transaction=False)
    for r in resources:
        pipe.hget(process.keys.resource(r).meta, "recipe")
    recipes = pipe.execute()
    claim, left = [], []
    for resource, recipe in zip(resources, recipes):
        if recipe and rebuild(process, recipe) is not None:
            claim.append(resource)
        else:
            left.append(resource)
    taken = release_many(process, [Release(r, "orphan") for r in claim])
    ready = []
    for got in taken:
        if got is None:
            continue  # a holder arrived, or someone else claimed it first
        update = rebuild(process, got.recipe)
        assert update is not None
        update.absorb(got.kind, got.items)
        ready.append((update, got))
    done = execute_taken(process, ready)
    executed = [u.resource for u, _ in ready if u in done]
    left += [u.resource for u, _ in ready if u not in done]
    return executed, left
