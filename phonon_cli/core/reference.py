"""A process's claim on a shared resource, and the batched scripts that take and leave them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .. import defaults
from ..store import scripts
from ..store.connection import is_cluster
from ..store.lock import Lock
from .quarantine import Poisoned, quarantine

if TYPE_CHECKING:
    from redis.client import Pipeline

    from ..store.keys import ResourceKeys
    from .process import Process

log = logging.getLogger(__name__)


Mode = Literal["end", "force", "cache", "orphan"]
"""How a resource is left (see ``scripts.RELEASE_LUA``): ``end`` executes as last
holder, ``force`` executes even if others hold it, ``cache`` deposits whatever
happens, ``orphan`` leaves a dead process's partial with no holder."""

Kind = Literal["json", "sums", "fields"]
"""How a partial is kept in Redis: a JSON document (``Update``), a hash summed in
place (``ConflictFreeUpdate``), or per-field slots (``FieldsUpdate``)."""


@dataclass
class Taken:
    """What a last holder took out of Redis: the partials the others left."""

    kind: Kind
    recipe: str
    items: list[str]
    exec_keys: tuple[str, str]
    execution_id: str | None = None
    """The identity of the taken set (``<pid>:<seq>`` of whoever first took it), kept
    through recovery; None when nothing was taken (no set exists in Redis)."""


@dataclass
class Release:
    """One resource to leave: how, and what to deposit if this is not the last holder."""

    resource: str
    mode: Mode = "end"
    kind: Kind = "json"
    recipe: str = ""
    payload: str = ""
    exec_keys: tuple[str, str] = field(default=("", ""))
    marks: str = ""
    """"partition\toffset\n...": the replayable source offsets the payload covers."""


def acquire_many(
    process: Process, resources: Sequence[str], absorb: Sequence[bool] | None = None
) -> list[tuple[str, list[str]] | None]:
    """Take references on many resources: one round trip per ``BATCH_MAX_KEYS``.

    The resources go into this process's held registry in the same script, so
    recovery always knows every nodelist this process is on.

    Raises:
        Fenced: this process was declared dead; nothing was taken.

    Returns, per resource, ``(kind, items)`` of the partials absorbed, or None.
    """
    if not resources:
        return []
    flags = absorb or [False] * len(resources)
    now = process.clock()

    ids = process.batch_ids(_calls(len(resources)))

    def build(pipe: Pipeline) -> None:
        _queue_acquire(pipe, process, resources, flags, now, ids)

    out: list[tuple[str, list[str]] | None] = []
    for result in scripts.run(process.client, build, process.store_timeout_s, op="acquire"):
        out += [(r[0], list(r[1:])) if r else None for r in scripts.answers(result)]
    return out


def _own_keys(process: Process, marks: bool) -> list[str]:
    """The caller's keys the batched scripts take first: the registry (fencing), its
    held set, its replies (lost replies) and, for RELEASE, the highest marks. On a
    cluster the replies are one hash per slot, named from a template the per-slot
    split fills in (store/slots.py), after the highest marks."""
    keys = [process.keys.processes, process.keys.held(process.id)]
    if is_cluster(process.client):
        if marks:  # raised by FENCE_HELD before the batch (store/slots.py)
            keys.append(process.keys.highest_marks)
        keys.append(process.keys.slot_replies(process.id))
    else:
        keys.append(process.keys.replies(process.id))
        if marks:
            keys.append(process.keys.highest_marks)
    return keys


def _calls(n: int) -> int:
    """Script calls for ``n`` resources (one per ``BATCH_MAX_KEYS``)."""
    return -(-n // defaults.BATCH_MAX_KEYS)


def _queue_acquire(
    pipe: Pipeline,
    process: Process,
    resources: Sequence[str],
    absorb: Sequence[bool],
    now: int,
    ids: Sequence[tuple[str, str]],
) -> None:
    pid = process.id
    fence = _own_keys(process, marks=False)
    for call, start in enumerate(range(0, len(resources), defaults.BATCH_MAX_KEYS)):
        keys: list[str] = list(fence)
        args: list[Any] = [pid, now, *ids[call]]
        for resource, flag in zip(
            resources[start : start + defaults.BATCH_MAX_KEYS],
            absorb[start : start + defaults.BATCH_MAX_KEYS],
        ):
            rk = process.keys.resource(resource)
            keys += [rk.nodes, rk.meta, rk.partials]
            args += ["1" if flag else "0", resource]
        scripts.queue(pipe, scripts.ACQUIRE, keys, args)


def release_many(
    process: Process, releases: Sequence[Release], acquire: Sequence[str] = ()
) -> list[Taken | None]:
    """Leave many resources (and take others) in one round trip: ``send_release_many``,
    waited for."""
    return send_release_many(process, releases, acquire)()[0]


Reply = Callable[[], "tuple[list[Taken | None], list[bool]]"]
"""Reads a batch's reply (``send_release_many``): what each release took, and
whether each resource tried ``alone`` was left."""


def send_release_many(
    process: Process,
    releases: Sequence[Release],
    acquire: Sequence[str] = (),
    alone: Sequence[str] = (),
) -> Reply:
    """Leave many resources (and take others) in one round trip, written now; the
    function returned reads the reply (``scripts.send``).

    ``alone`` names resources to leave first the sole holder's way
    (``scripts.RELEASE_ALONE``: mode "end", no marks, not on a cluster): each is
    left, with nothing to take, if nobody else holds it and no partial waits;
    any other is left untouched, for a ``release_many`` of its own. None of them
    may be among ``releases`` or ``acquire``.

    Each is left atomically with its deposit (the invariant). ``acquire`` names
    resources to take references on in the same round trip, after the
    releases, so a key that left the cache and came back within one batch
    ends up held. Returns, per release, what was taken when this process was
    the last holder (or forced).

    A release that names its ``exec_keys`` (caching back a failed execute)
    deletes those in the same step as it deposits, so the set can never be both
    deposited and left to recovery.

    Raises:
        Fenced: this process was declared dead; nothing at all was applied
            (every script of the pipeline checks, and the check cannot pass again).
    """
    if not releases and not acquire and not alone:
        return lambda: ([], [])
    now = process.clock()
    pid = process.id
    resource_keys = []
    for rel in releases:
        rk = process.keys.resource(rel.resource)
        if not rel.exec_keys[0]:
            rel.exec_keys = rk.executing(pid, process.next_exec_seq())
        resource_keys.append(rk)
    chunks = range(0, len(releases), defaults.BATCH_MAX_KEYS)
    fence = _own_keys(process, marks=True)
    lone = _calls(len(alone))
    ids = process.batch_ids(lone + len(chunks) + _calls(len(acquire)))

    def build(pipe: Pipeline) -> None:
        if alone:
            _queue_alone(pipe, process, alone, now, ids[:lone])
        for call, start in enumerate(chunks):
            keys: list[str] = list(fence)
            args: list[Any] = [pid, now, *ids[lone + call]]
            end = start + defaults.BATCH_MAX_KEYS
            for rel, rk in zip(releases[start:end], resource_keys[start:end]):
                keys += [rk.nodes, rk.meta, rk.partials, *rel.exec_keys, rk.seen]
                args += [rel.mode, rel.kind, rel.recipe, rel.payload, rel.resource, rel.marks]
            scripts.queue(pipe, scripts.RELEASE, keys, args)
        if acquire:
            _queue_acquire(
                pipe, process, acquire, [False] * len(acquire), now, ids[lone + len(chunks) :]
            )

    op = "release" if releases or alone else "acquire"
    pending = scripts.send(process.client, build, process.store_timeout_s, op=op)

    def reply() -> tuple[list[Taken | None], list[bool]]:
        results = pending()
        left = [flag == "1" for result in results[:lone] for flag in scripts.answers(result)]
        return _taken(process, releases, results[lone : lone + len(chunks)]), left

    return reply


def _queue_alone(
    pipe: Pipeline,
    process: Process,
    resources: Sequence[str],
    now: int,
    ids: Sequence[tuple[str, str]],
) -> None:
    """RELEASE_ALONE calls for ``resources`` (see ``send_release_many``)."""
    pid = process.id
    fence = _own_keys(process, marks=False)
    holding = process.keys.holding
    for call, start in enumerate(range(0, len(resources), defaults.BATCH_MAX_KEYS)):
        keys: list[str] = list(fence)
        args: list[Any] = [pid, now, *ids[call]]
        for resource in resources[start : start + defaults.BATCH_MAX_KEYS]:
            keys += holding(resource)
            args.append(resource)
        scripts.queue(pipe, scripts.RELEASE_ALONE, keys, args)


def _taken(process: Process, releases: Sequence[Release], results: list[Any]) -> list[Taken | None]:
    """What RELEASE answered, per release (see ``release_many``)."""
    replies = [reply for result in results for reply in scripts.answers(result)]
    refused = [
        Poisoned(rel.resource, rel.kind, rel.recipe, rel.payload, str(r[1]), rel.exec_keys)
        for rel, r in zip(releases, replies)
        if r[0] == 2
    ]
    if refused:
        # The script left these resources without merging their deposit (a sum
        # Redis cannot hold): the partial is only in memory now, so set it aside.
        quarantine(process, refused)
    return [
        None
        if r[0] not in (1, 3)
        else Taken(
            kind=r[1],
            recipe=r[2],
            items=list(r[3:]),
            exec_keys=rel.exec_keys,
            execution_id=execution_id(rel.exec_keys[0]) if len(r) > 3 or r[0] == 3 else None,
        )
        for rel, r in zip(releases, replies)
    ]


def execution_id(exec_key: str) -> str:
    """``<pid>:<seq>``, the identity of the set taken into ``exec_key`` (as RELEASE
    records it in the set's recipe)."""
    return ":".join(exec_key.rsplit(":", 2)[-2:])


def put_back(resource: str, taken: Taken) -> list[Release]:
    """The releases that deposit ``taken`` again, untouched."""
    if taken.kind in ("sums", "fields"):
        pairs = zip(taken.items[::2], taken.items[1::2])
        payload = "".join(f"{f}\t{v}\n" for f, v in pairs)
        return [Release(resource, "cache", taken.kind, taken.recipe, payload)]
    return [Release(resource, "cache", "json", taken.recipe, item) for item in taken.items]


def finish(process: Process, taken: Sequence[Taken]) -> None:
    """Forget partials once their write is done (one round trip for all, none if
    nothing was taken: the script only keeps partials it found)."""
    keys = [k for t in taken if t.execution_id is not None for k in t.exec_keys]
    if keys:

        def build(pipe: Pipeline) -> None:
            for key in keys:  # one key per DEL: a cluster pipeline refuses several
                pipe.delete(key)

        scripts.run(process.client, build, process.store_timeout_s, op="finish")


class Reference:
    """A process's claim on ``resource``.

    ``count()`` tells how many live processes hold it; ``dereference`` tells
    this process whether it was the last, and only then runs the callback.
    """

    def __init__(self, process: Process, resource: str, block: bool = True) -> None:
        self.process = process
        self.resource = resource
        self.block = block
        self.force_expiry = False
        """When set, ``dereference`` runs its callback even if others still hold the resource."""

    @property
    def keys(self) -> ResourceKeys:
        """Built when asked: the run loop makes a Reference per key and rarely needs them."""
        return self.process.keys.resource(self.resource)

    def acquire(self) -> None:
        acquire_many(self.process, [self.resource])

    def lock(self, block: bool | None = None) -> Lock:
        """The resource's lock, as a context manager. Raises ``Process.AlreadyLocked``."""
        return self.process.make_lock(self.keys.lock, block=self.block if block is None else block)

    def count(self) -> int:
        """How many live processes hold this resource."""
        holders: list[str] = self.process.client.hkeys(self.keys.nodes)  # type: ignore[assignment]
        return len(self.process.live_processes(holders)) if holders else 0

    def refresh_session(self) -> None:
        """Record activity on the resource (shown by ``phonon status``)."""
        self.process.client.hset(self.keys.meta, "touched_ms", self.process.clock())

    def increment_times_modified(self) -> int:
        return int(self.process.client.hincrby(self.keys.meta, "times_modified", 1))

    def get_times_modified(self) -> int:
        return int(self.process.client.hget(self.keys.meta, "times_modified") or 0)

    def dereference(
        self,
        callback: Callable[..., Any] | None = None,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        block: bool | None = None,
    ) -> bool:
        """Leave the resource; True (and the callback run) only for the last holder.

        ``block`` is accepted for the seed's signature: leaving takes no lock.
        """
        mode: Mode = "force" if self.force_expiry else "end"
        (taken,) = release_many(self.process, [Release(self.resource, mode=mode)])
        if taken is None:
            return False
        if taken.items:
            # A bare reference has no state to merge partials into: they belong to
            # Updates of the same resource, so they go back for the next holder.
            log.warning(
                "%s: a bare reference took %d partials; putting them back",
                self.resource,
                len(taken.items),
            )
            release_many(self.process, put_back(self.resource, taken))
        if callback is not None:
            callback(*(args or ()), **(kwargs or {}))
        finish(self.process, [taken])
        return True
