"""Recovery: what survivors do for processes that died holding references.

A dead process is removed from every nodelist it was on, partials it had taken
to execute are put back, and partials left with no holder are executed by a
survivor that knows their class (never a class named by data). Everything here
is idempotent, so a survivor that dies half way leaves work the next one redoes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import orjson
import redis

from .. import defaults, faults
from ..exceptions import AlreadyLocked, LockNotOwned
from ..store import is_cluster, liveness, scripts
from ..store.keys import Keys
from ..store.lock import Lock, owner_of
from .reference import Kind, Release, Taken, release_many
from .update import Update, execute_taken

if TYPE_CHECKING:
    from redis.client import Pipeline

    from .process import Process

log = logging.getLogger(__name__)


def dead_processes(process: Process) -> list[str]:
    """Registered processes whose alive key has expired (never this one)."""
    registered = cast("list[str]", process.client.zrange(process.keys.processes, 0, -1))
    ids = [pid for pid in registered if pid != process.id]
    up = liveness.alive(process.client, process.keys, ids)
    return [pid for pid in ids if pid not in up]


def declare_dead(process: Process, candidates: Sequence[str]) -> list[str]:
    """Fence the candidates still silent, then return every process declared dead
    whose recovery is not finished (some perhaps by a survivor that died)."""
    if candidates:
        keys = [process.keys.processes, process.keys.declared_dead]
        keys += [process.keys.alive(pid) for pid in candidates]
        scripts.DECLARE_DEAD(keys=keys, args=list(candidates), client=process.client)
    dead = cast("set[str]", process.client.smembers(process.keys.declared_dead))
    return sorted(dead - {process.id})


def recover(process: Process) -> int:
    """Clean up after every dead process; returns how many were recovered.

    Runs under a ``SET NX EX`` maintenance lock, so survivors take turns.
    Each silent process is first declared dead (fenced: see ``scripts.FENCE_LUA``),
    so nothing it does from then on can land. Then for each: remove it from
    every nodelist it was on and adopt the partials it had taken to execute.
    Only then, with the lock released, are the adopted sets executed and what
    is left with no live holder claimed, where this process knows the class;
    the dead are forgotten (``unregister``) last, so that a survivor that dies
    before that leaves them to the next, orphans and all.

    Writing waits on a sink (and may be where a worker is killed): under the
    lock, a survivor killed while writing would stop every recovery for the
    lock's whole TTL, the adopted sets of the dead it was recovering included.
    Outside it, what the survivor adopted is in its own exec keys, and the next
    survivor recovers those as any dead worker's.
    """
    candidates = dead_processes(process)
    if not candidates and not _waiting(process):
        return 0
    # A test hook: from before the lock is taken until what it adopted is written.
    faults.recovering(True)
    try:
        return _recover(process, candidates)
    finally:
        faults.recovering(False)


def _recover(process: Process, candidates: list[str]) -> int:
    """``recover``, once it has work: Redis work under the lock, writes after it."""
    lock = Lock(
        process.client,
        process.keys.recovery_lock,
        block=False,
        ttl_ms=defaults.RECOVERY_LOCK_TTL_S * 1000,
        owner=process.id,
    )
    try:
        lock.acquire()
    except AlreadyLocked:
        if not _take_from_the_dead(process, lock):
            return 0
    ready: list[tuple[Update, Taken]] = []
    orphans: list[str] = []
    try:
        faults.point("in-recovery")
        dead = declare_dead(process, candidates)
        if not process.known_classes:
            # Just started, its classes not registered yet: it would have to merge
            # the dead's exec sets back and lose their identity. Fenced already,
            # they wait for the next pass.
            return 0
        for pid in dead:
            got, left = take_over(process, pid)
            ready += got
            orphans += left
        ready += take_stranded(process)
    finally:
        try:
            lock.release()
        except LockNotOwned:
            log.warning("recovery took longer than its lock; another survivor may have helped")
    faults.point("before-orphans")
    if ready:
        execute_taken(process, ready)
    if orphans:
        claim_orphans(process, sorted(set(orphans)))
    # Only now: the orphans were found in this pass's memory only. Forgotten
    # before, a survivor killed (or fenced) before claiming them left them with
    # no holder and no dead process to find them from, until ``flush -c``.
    # Declared dead still, the dead are recovered again by the next survivor,
    # and take_over finds them again (idempotent; each orphan is taken once).
    for pid in dead:
        unregister(process, pid)
    return len(dead)


def _waiting(process: Process) -> bool:
    """Recovery work with no silent process to find it: the declared dead whose
    recovery did not finish, sets stranded for a process that knows their class."""
    pipe = process.client.pipeline(transaction=False)
    pipe.scard(process.keys.declared_dead)
    pipe.scard(process.keys.stranded)
    return any(pipe.execute())


def take_stranded(process: Process) -> list[tuple[Update, Taken]]:
    """Adopt the stranded sets whose class this process knows, for it to execute each
    under its own execution id (so a zombie that wrote it too is not counted
    twice); returns them, ready. A set that is gone (its owner wrote and forgot it
    after all) is dropped from the list. Sets of classes still unknown stay listed."""
    stranded = sorted(cast("set[str]", process.client.smembers(process.keys.stranded)))
    if not stranded:
        return []
    pipe = process.client.pipeline(transaction=False)
    for key in stranded:
        pipe.exists(key)
    exists = pipe.execute()
    gone = [key for key, there in zip(stranded, exists) if not there]
    here = [key for key, there in zip(stranded, exists) if there]
    mine = [
        key for key, known in zip(here, _adoptable(process, [f"{k}:recipe" for k in here])) if known
    ]
    by_owner: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for key in mine:
        resource, owner = process.keys.resource_of(key), Keys.executing_owner(key)
        if resource is not None and owner is not None:
            by_owner[owner].append((resource, key, f"{key}:recipe"))
    adopted: list[tuple[Update, Taken]] = []
    for owner, entries in by_owner.items():
        adopted += _recover_entries(process, owner, entries, [True] * len(entries))[1]
    if gone or mine:
        process.client.srem(process.keys.stranded, *gone, *mine)
    return adopted


def _take_from_the_dead(process: Process, lock: Lock) -> bool:
    """Take the recovery lock over from a process that died holding it.

    Its expiry (``RECOVERY_LOCK_TTL_S``) would free it, but until then nobody could
    recover anyone. Once its owner's alive key is gone, the owner counts as dead as
    for everything else: it is declared dead in this very pass (so it is fenced),
    and what it had adopted is in its own exec keys, recovered as any dead
    worker's. Should it only have been paused, recovery is idempotent and the
    sinks recognise a set written twice, as when the lock expires under a slow
    recovery.
    """
    token = cast("str | None", process.client.get(lock.key))
    owner = owner_of(token)
    if token is None or owner is None or owner == process.id or process.live_processes([owner]):
        return False
    if not lock.take_over(token):
        return False
    log.warning("process %s died holding the recovery lock; taken over", owner)
    return True


@dataclass
class RecoveryLock:
    """Who holds the recovery lock, as ``status`` and ``flush -c`` report it."""

    owner: str | None
    """The process id that took it (None: taken by a version that did not say)."""
    owner_alive: bool
    expires_in_s: float | None
    """Seconds before it expires on its own (None: no expiry, which phonon never sets)."""

    def describe(self) -> str:
        who = "an unknown process" if self.owner is None else f"process {self.owner}"
        state = "alive, recovering" if self.owner_alive else "dead"
        expiry = "" if self.expires_in_s is None else f", expires in {self.expires_in_s:.0f}s"
        return f"the recovery lock is held by {who} ({state}){expiry}"

    def to_json(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "owner_alive": self.owner_alive,
            "expires_in_s": self.expires_in_s,
        }


def recovery_lock(client: redis.Redis, keys: Keys) -> RecoveryLock | None:
    """The recovery lock's holder, or None when nobody holds it. A holder that died
    mid-recovery blocks every recovery until the lock expires: this says so."""
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.recovery_lock)
    pipe.pttl(keys.recovery_lock)
    token, ttl_ms = pipe.execute()
    if token is None:
        return None
    owner = owner_of(token)
    alive = bool(owner) and bool(client.exists(keys.alive(owner)))  # type: ignore[arg-type]
    return RecoveryLock(owner, alive, None if ttl_ms < 0 else round(ttl_ms / 1000, 1))


def unregister(process: Process, pid: str) -> None:
    """Forget process ``pid``: its registry entry, figures, held set, alive key and
    replies (on a cluster, a SCAN finds its per-slot replies). Another process's is
    forgotten because it was declared dead, and that is written down for a while
    (``Keys.declared_dead_once``)."""
    pipe = process.client.pipeline(transaction=False)
    if pid != process.id:  # before its hash goes: a flush --wait reads one or the other
        pipe.set(process.keys.declared_dead_once(pid), 1, px=defaults.SUCCESSOR_TTL_MS)
    for key in (
        process.keys.held(pid),
        process.keys.process(pid),
        process.keys.alive(pid),
        process.keys.replies(pid),
    ):
        pipe.delete(key)  # one key per DEL: a cluster pipeline refuses several
    pipe.zrem(process.keys.processes, pid)
    pipe.srem(process.keys.declared_dead, pid)
    if is_cluster(process.client):  # its replies, one hash per slot it wrote in
        for key in process.client.scan_iter(
            match=process.keys.slot_replies_pattern(pid), count=1000
        ):
            pipe.delete(key)
    pipe.execute()


def release_resources_of(process: Process, pid: str, scan_executing: bool = True) -> list[str]:
    """Remove process ``pid`` from every nodelist, execute the sets it was writing
    (``take_over``); return resources left orphaned."""
    ready, orphans = take_over(process, pid, scan_executing)
    if ready:
        execute_taken(process, ready)
    return orphans


def take_over(
    process: Process, pid: str, scan_executing: bool = True
) -> tuple[list[tuple[Update, Taken]], list[str]]:
    """Remove process ``pid`` from every nodelist and adopt the sets it was writing;
    return them, ready to execute, and the resources left orphaned.

    Idempotent, so a survivor that dies half way leaves work the next one can redo.
    Partials ``pid`` had taken to execute (an exec set) are adopted whole, with
    their execution id, into this process's exec keys, for it to execute when it
    knows their class: if ``pid`` was only paused and writes them too, an
    idempotent sink sees the same id twice and writes once; if this process dies
    before writing them, they are its own exec sets, recovered the same way. A
    set of a class unknown here is left whole where it is, id and all, and listed
    as stranded (``Keys.stranded``) for a process that knows the class
    (``take_stranded``), before ``pid`` is unregistered: merged into the
    partials, it would be written again under another id by whoever executes
    them, while the zombie may write it too.

    Args:
        scan_executing: also SCAN for partials ``pid`` took to execute and never
            forgot (it died mid-write). A process stopping cleanly has none
            (it forgets them right after each write), so it skips the SCAN of
            the whole namespace.
    """
    entries = _entries_of(process, pid, scan_executing)
    adopt = _adoptable(process, [e[2] for e in entries]) if scan_executing else []
    orphans, ready, kept = _recover_entries(process, pid, entries, adopt or [False] * len(entries))
    if kept:
        process.client.sadd(process.keys.stranded, *kept)
        log.warning(
            "process %s died writing %d sets of a class this worker does not know; "
            "kept whole for one that does (or phonon flush -c)",
            pid,
            len(kept),
        )
    if entries:
        log.info("recovered process %s: released %d references", pid, len(entries))
    return ready, orphans


def _recover_entries(
    process: Process, pid: str, entries: list[tuple[str, str, str]], adopt: list[bool]
) -> tuple[list[str], list[tuple[Update, Taken]], list[str]]:
    """RECOVER ``entries`` (resource, exec key, recipe key) of process ``pid``: adopt
    the sets flagged in ``adopt`` (into this process's exec keys), keep the others
    where they are. Returns the resources left orphaned, the adopted sets ready to
    execute and the exec keys kept."""
    orphans: list[str] = []
    kept: list[str] = []
    ready: list[tuple[Update, Taken]] = []
    now = process.clock()
    for start in range(0, len(entries), defaults.BATCH_MAX_KEYS):
        chunk = entries[start : start + defaults.BATCH_MAX_KEYS]
        flags = adopt[start : start + defaults.BATCH_MAX_KEYS]
        keys: list[str] = []
        args: list[str | int] = [pid, now]
        mine: list[tuple[str, str]] = []
        for (resource, exec_key, recipe_key), flag in zip(chunk, flags):
            rk = process.keys.resource(resource)
            # "keep" ignores the adopt keys: the set's own keys stand in for them
            own = (
                rk.executing(process.id, process.next_exec_seq())
                if flag
                else (exec_key, recipe_key)
            )
            mine.append(own)
            keys += [rk.nodes, rk.meta, rk.partials, exec_key, recipe_key, *own]
            args.append("adopt" if flag else "keep")

        def build(pipe: Pipeline, keys: list[str] = keys, args: list[str | int] = args) -> None:
            scripts.queue(pipe, scripts.RECOVER, keys, args)

        (results,) = scripts.run(process.client, build, op="recover")
        for (resource, exec_key, _), own, (left, cached, saved, *items) in zip(
            chunk, mine, results
        ):
            if saved:
                got = _adopted(process, resource, saved, items, own)
                if got is not None:
                    ready.append(got)
            elif items == ["kept"]:
                kept.append(exec_key)
            if not saved and not left and cached:
                orphans.append(resource)
    return sorted(set(orphans)), ready, kept


def _entries_of(process: Process, pid: str, scan_executing: bool) -> list[tuple[str, str, str]]:
    """(resource, exec key, exec recipe key) of every resource ``pid`` held (exec keys
    that never exist: seq 0) and, with ``scan_executing``, of every exec set it left."""
    resources = cast("set[str]", process.client.smembers(process.keys.held(pid)))
    entries = [(r, *process.keys.resource(r).executing(pid, 0)) for r in resources]
    if scan_executing:
        pattern = process.keys.executing_pattern(pid)
        for key in process.client.scan_iter(match=pattern, count=1000):
            of = process.keys.resource_of(key)
            if of is not None and not Keys.is_recipe(key):
                entries.append((of, key, f"{key}:recipe"))
    return entries


def _adoptable(process: Process, recipe_keys: list[str]) -> list[bool]:
    """Per exec set, whether this process knows its class (and so may execute it)."""
    if not recipe_keys:
        return []
    pipe = process.client.pipeline(transaction=False)
    for key in recipe_keys:  # GETs, not MGET: on a cluster the keys are on many nodes
        pipe.get(key)
    saved = cast("list[str | None]", pipe.execute())
    return [s is not None and _known(process, split_exec_recipe(s)[2]) for s in saved]


def _known(process: Process, recipe: str) -> bool:
    try:
        return orjson.loads(recipe).get("cls") in process.known_classes
    except (orjson.JSONDecodeError, AttributeError):
        return False


def split_exec_recipe(saved: str) -> tuple[Kind, str, str]:
    """``(kind, execution id, recipe)`` of an exec set's recipe key (see RELEASE_LUA);
    the kind as the depositing class wrote it (an unknown one fails in ``absorb``)."""
    kind, _, rest = saved.partition("\n")
    eid, _, recipe = rest.partition("\n")
    return cast("Kind", kind), eid, recipe


def _adopted(
    process: Process, resource: str, saved: str, items: list[str], keys: tuple[str, str]
) -> tuple[Update, Taken] | None:
    """A dead process's exec set, adopted into ``keys``, ready to execute under its id."""
    kind, eid, recipe = split_exec_recipe(saved)
    update = rebuild(process, recipe)
    if update is None:  # known a moment ago: cannot happen, but never drop the set
        log.error("%s: adopted an exec set of an unknown class; left in %s", resource, keys[0])
        return None
    update.absorb(kind, items)
    update.execution_id = eid
    return update, Taken(kind, recipe, items, keys, eid)


def rebuild(process: Process, recipe: str) -> Update | None:
    """An empty update from a recipe, if this process knows its class; never imports."""
    try:
        r = orjson.loads(recipe)
        cls = process.known_classes.get(r["cls"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if cls is None:
        return None
    database = r.get("database")
    if isinstance(database, str) and "***" in database:
        # Named without its password: only this process's own config has the real URL.
        database = process.databases.get(database)
        if database is None:
            log.warning(
                "%s: its database %s is not in this worker's config; left in redis",
                r.get("collection"),
                r.get("database"),
            )
            return None
    update = cls(
        process,
        r["id"],
        database=database,
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
        update.execution_id = got.execution_id
        ready.append((update, got))
    done = execute_taken(process, ready)
    executed = [u.resource for u, _ in ready if u in done]
    left += [u.resource for u, _ in ready if u not in done]
    return executed, left
