"""The contract every source keeps, and what they share.

Each source feeds chunks of raw lines to the run loop.

Fairness between sources: each source has its own thread putting chunks on the
run loop's one bounded FIFO queue. A thread blocked on the full queue waits its
turn behind the chunks already queued, so with several sources the loop takes
chunks roughly in turn and a busy source cannot starve a quiet one: it can only
fill its share of the queue.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .. import defaults

if TYPE_CHECKING:
    import redis

    from ..core.process import Process

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reject:
    """A line a source read but cannot hand over as an event (too long, an entry
    without the configured field). The run loop dead-letters it with ``reason``
    and the bytes as read, so it can be replayed once fixed; ``raw`` is cut only
    past ``DEAD_LETTER_KEEP_BYTES``, and then ``truncated`` says so."""

    raw: bytes
    reason: str
    truncated: bool = False


def too_long(line: bytes, limit: int, length: int | None = None) -> Reject:
    """The reject for a line over ``limit`` bytes; ``length`` when only a prefix of
    it was kept while reading (a stream reader need not hold all of it)."""
    length = len(line) if length is None else length
    keep = line[: defaults.DEAD_LETTER_KEEP_BYTES]
    return Reject(
        keep, f"line of {length:,} bytes is over the limit of {limit:,}", len(keep) < length
    )


@dataclass
class Chunk:
    """Raw lines read from one source; ``end`` marks the source exhausted."""

    source: str
    lines: list[bytes] = field(default_factory=list)
    end: bool = False
    partition: str | None = None
    """Where offsets are kept for this chunk; None for sources with nothing to commit."""
    first_offset: int = 0
    """Offset of ``lines[0]``; line i has offset ``first_offset + i``."""
    rejects: dict[int, Reject] = field(default_factory=dict)
    """Index in ``lines`` -> why that line is no event. The line itself is left
    empty there, so it still takes its offset and costs the hot path nothing."""
    owner: str | None = None
    """Replayable sources: the process id the chunk was read under. A process fenced
    and started over under a new id drops what it read before (the source still
    has it for whoever reads it next), so the run loop discards such a chunk."""
    sequence: str | None = None
    """Streams: the consumer the entries were delivered to, in increasing id order:
    the name their marks go by (scripts.RELEASE_LUA's MARKS)."""
    replay_of: tuple[str, ...] = ()
    """Streams: entries claimed from a dead consumer: it, then the consumers its
    entries had been claimed from before it (``stream.StreamSource._lineage``). A
    line is skipped on a key whose marks of any of them cover it."""
    ids: list[str] | None = None
    """Streams: the entry id of each line (the marks), as ``lines``."""

    def reject(self, reject: Reject) -> None:
        self.rejects[len(self.lines)] = reject
        self.lines.append(b"")


class Source(Protocol):
    """A reader that runs on its own thread and puts ``Chunk``s on the run loop's queue.

    A source must never block the run loop: reading happens on the source's
    thread, and the bounded queue pushes back when the loop falls behind.
    """

    name: str
    max_line_bytes: int
    """Longer lines are rejects, not events."""

    def start(self, out: queue.Queue[Chunk]) -> None:
        """Begin reading into ``out``; put a ``Chunk(end=True)`` when done."""

    def stop(self) -> None:
        """Stop reading soon (the thread is a daemon: it never holds up exit)."""

    def commit(self, partition: str, offset: int) -> None:
        """Every event of ``partition`` below ``offset`` is safe (executed or cached in
        Redis): a restart may resume there, and a stream may acknowledge them."""


def put_or_tick(
    out: queue.Queue[Chunk],
    chunk: Chunk,
    stop: threading.Event,
    tick_s: float,
    on_tick: Callable[[], object],
) -> bool:
    """Put ``chunk`` on the run loop's queue, doing the source's upkeep while it is full.

    A source waiting on a full queue must still extend its locks and heartbeat
    its group membership, or a slow run loop would cost it its partitions.
    Once ``stop`` is set the loop may never read again: give up instead of waiting.

    Returns:
        Whether the chunk was put.
    """
    while True:
        try:
            out.put(chunk, timeout=tick_s)
            return True
        except queue.Full:
            if stop.is_set():
                return False
            on_tick()


class ThreadedSource:
    """A source whose reading runs on a daemon thread of its own, so it never blocks
    the run loop (and never holds up exit). Subclasses set ``name`` and write
    ``_run(out)``, watching ``self._stop``; ``stop`` only sets that event, which
    makes it safe to call from a signal handler."""

    name: str
    max_line_bytes: int = defaults.MAX_LINE_BYTES
    """Longer lines are rejects (``phonon run --max-line-bytes``)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, out: queue.Queue[Chunk]) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(out,), daemon=True, name=f"phonon-source-{self.name}"
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, out: queue.Queue[Chunk]) -> None:
        raise NotImplementedError


class Group:
    """The workers of one consumer group reading one source.

    A sorted set of process ids (score: last seen, epoch ms) that each member
    re-adds every tick; a member is live while its process is (its ``alive``
    key, refreshed by the process heartbeat), so a killed worker drops out
    within three heartbeats without anyone having to notice its exit.
    """

    def __init__(self, process: Process, key: str) -> None:
        self.process = process
        self.key = key
        self.dead: set[str] = set()
        """Members seen at the last refresh whose process is dead."""
        self._first_beats: dict[str, str] = {}
        """Other members' heartbeat when this worker first waited for them before
        ending (``silent``)."""
        self._waited = False

    def refresh(self, join: bool = True, prune: bool = True) -> set[str]:
        """Rejoin (unless ``join`` is False) and return the live members (us included).

        Args:
            join: add this worker (False once it has stopped reading).
            prune: forget dead members at once (a stream first claims their entries).
        """
        me = self.process.id
        pipe = self.process.client.pipeline(transaction=False)
        if join:
            pipe.zadd(self.key, {me: self.process.clock()})
        pipe.zrange(self.key, 0, -1)
        ids = set(pipe.execute()[-1])
        others = ids - {me}
        live = self.process.live_processes(others) if others else set()
        self.dead = others - live
        if prune and self.dead:
            self.forget(self.dead)
        return live | ({me} if join else set())

    def silent(self, others: Sequence[str], source: str, what: str) -> list[str]:
        """Of ``others`` (members whose work a worker without ``--follow`` would
        leave undone by ending: ``what`` they hold, for the log), those that have not
        beaten since this worker began to wait for them.

        A worker killed a moment ago still counts as alive until its alive key
        expires (three of its heartbeats), and keeps what it held meanwhile (file
        partitions, a stream consumer's pending entries): a worker restarted at once
        would end having read nothing, and nobody would count the rest (what the
        killed one held only in memory among it). So before ending it hears from
        each: a live one beats within its interval (the value of its alive key
        changes), a dead one's key expires and what it held comes to us. This costs
        a run's end at most one heartbeat of another member, and nothing when it is
        alone.
        """
        if not others:
            return []
        pipe = self.process.client.pipeline(transaction=False)
        for owner in others:
            pipe.get(self.process.keys.alive(owner))  # its last heartbeat, epoch ms
        silent = []
        for owner, beat in zip(others, pipe.execute()):
            # No alive key any more: it expired since the group was read, so what it
            # held is ours at the next tick (not done yet either).
            if beat is None or self._first_beats.setdefault(owner, beat) == beat:
                silent.append(owner)
        if silent and not self._waited:
            log.info(
                "%s: before ending, waiting to hear from %s %s", source, what, ", ".join(silent)
            )
        self._waited = self._waited or bool(silent)
        return silent

    def forget(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        if ids:
            self.process.client.zrem(self.key, *ids)

    def leave(self) -> None:
        """Stop being assigned work (called from the reading thread, not a signal handler)."""
        try:
            self.forget([self.process.id])
        except Exception:  # noqa: BLE001 - a dead member is pruned by the others anyway
            log.debug("leaving group %s failed", self.key, exc_info=True)


def assign(
    partitions: Sequence[str], members: Sequence[str], owners: Mapping[str, str]
) -> dict[str, list[str]]:
    """Split partitions between members, as evenly as possible, moving as few as possible.

    Every member computes this for itself from the same inputs, so all agree
    without talking. It is sticky: a partition stays with its current owner
    while that owner has room, and the members owning most get the larger
    shares. Plain ``i % n`` would also reshuffle survivors' partitions when one
    member dies, and each move of a partition whose events are not yet safe
    may count them twice.

    Args:
        partitions: every partition, in a fixed order.
        members: the live members, in a fixed order.
        owners: partition -> its current owner (live members only).

    Returns:
        member -> its partitions, in the order of ``partitions``.
    """
    if not members:
        return {}
    base, extra = divmod(len(partitions), len(members))
    held = {m: 0 for m in members}
    for p in partitions:
        if owners.get(p) in held:
            held[owners[p]] += 1
    by_share = sorted(members, key=lambda m: (-held[m], m))
    room = {m: base + (1 if i < extra else 0) for i, m in enumerate(by_share)}
    plan: dict[str, list[str]] = {m: [] for m in members}
    rest = []
    for p in partitions:
        owner = owners.get(p)
        if owner is not None and room.get(owner, 0) > 0:
            plan[owner].append(p)
            room[owner] -= 1
        else:
            rest.append(p)
    for p in rest:
        member = next(m for m in members if room[m] > 0)
        plan[member].append(p)
        room[member] -= 1
    order = {p: i for i, p in enumerate(partitions)}
    return {m: sorted(ps, key=order.__getitem__) for m, ps in plan.items()}


def bytes_client(process: Process) -> redis.Redis:
    """A connection like the process's, but answering bytes.

    Event payloads need not be UTF-8: the process's decoding client would raise
    on one and kill the reader, where the run loop dead-letters it with a reason.
    """
    from ..store.connection import clone

    return clone(process.client, decode_responses=False)


def split_lines(lines: Iterable[bytes], chunk: Chunk, limit: int) -> None:
    """Append ``lines`` to ``chunk``, rejecting those over ``limit`` bytes."""
    for line in lines:
        if len(line) > limit:
            chunk.reject(too_long(line, limit))
        else:
            chunk.lines.append(line)


def split_payload(data: bytes, chunk: Chunk, limit: int) -> None:
    """Append a message's lines to ``chunk`` (blank ones dropped), rejecting those
    over ``limit`` bytes."""
    split_lines((line for line in data.split(b"\n") if line.strip()), chunk, limit)
