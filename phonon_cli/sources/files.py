"""``file:PATH``: a Kafka-style log on disk, read by a consumer group.

PATH is a topic directory of partition directories ``NAME-N/``, each holding
segment files named by their base offset (``00000000000000000000.jsonl``); or a
single ``.jsonl`` file, one partition. An event's offset is its line index in
its partition, so a committed offset says "every line below this one is safe".

Who reads what: the live workers of a group split the sorted partitions between
them (``assign``), each partition guarded by a lock with a TTL that its reader
extends. A worker that loses a partition stops reading it and releases the
lock; the next owner starts from the committed offset. Timeline of a handover::

    A reads p to 900, p's committed offset is 500 (400 events only in A's cache)
    B joins: p is now B's    -> A stops reading p, releases its lock
    B takes the lock          -> B reads p from 500
    A's 400 events are later executed or cached -> counted twice (at-least-once)

A stopping worker (signal, or end of input) keeps its locks until the process
stops, which is after the run loop's final commit: whoever takes over then
starts where the safe data ends, so a clean stop hands over without duplicates.

A worker fenced (declared dead while paused) and started over under a new id
lets go of every partition and forgets where it was: the run loop dropped what
it held of them, so whoever reads a partition next, itself included, starts
from the committed offset, and the marks of what was deposited or written make
that replay count each event once (run/loop.py ``_skip_counted``).
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson
import redis

from .. import defaults
from ..exceptions import AlreadyLocked, LockNotOwned, SourceError
from .base import Chunk, Group, ThreadedSource, assign, put_or_tick, split_lines, too_long

if TYPE_CHECKING:
    from ..core.process import Process
    from ..store.lock import Lock

log = logging.getLogger(__name__)

SEGMENT = re.compile(r"^(\d{20})\.jsonl$")
"""A segment file: its base offset, 20 digits, as Kafka names them."""
PARTITION = re.compile(r"^.+-(\d+)$")
"""A partition directory: ``NAME-N``."""
READ_SIZE = 1 << 16
"""Bytes per read, so a chunk holds at most about 64 KiB of lines."""
IDLE_WAIT_S = 0.05
"""Seconds to wait when no owned partition had new data."""


def discover(path: Path) -> dict[str, Path]:
    """Partition name -> its directory (or the single file) under a topic path."""
    if path.is_file():
        return {path.name: path}
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return {}
    parts = {e.name: Path(e.path) for e in entries if e.is_dir() and PARTITION.match(e.name)}
    if not parts and any(SEGMENT.match(e.name) for e in entries):
        return {path.name: path}  # a lone partition directory given as the topic
    return parts


def segments(part: Path) -> list[tuple[int, Path]]:
    """(base offset, path) of a partition's segments, in offset order."""
    if part.is_file():
        return [(0, part)]
    try:
        names = os.listdir(part)
    except FileNotFoundError:
        return []
    return sorted((int(m.group(1)), part / n) for n in names if (m := SEGMENT.match(n)))


class PartitionReader:
    """Reads one partition's lines in order, from a start offset, tailing as it grows.

    A line is read only once it ends with a newline (a writer may be half way
    through it), except the last line of a segment that a later segment
    follows: that one is complete. A line over ``max_line_bytes`` becomes a
    ``Reject`` (one offset, its bytes kept), so the run loop dead-letters it.
    """

    def __init__(
        self, name: str, path: Path, start: int, max_line_bytes: int = defaults.MAX_LINE_BYTES
    ) -> None:
        self.name = name
        self.max_line_bytes = max_line_bytes
        self.path = path
        self.start = start
        self.next_offset = start
        """Offset of the next line this reader will hand out."""
        self.at_end = False
        """Nothing more to read right now (and no later segment)."""
        self._base = -1  # base offset of the open segment
        self._line = 0  # offset of the line being assembled
        self._file: IO[bytes] | None = None
        self._rest = b""
        self._long: bytearray | None = None  # a line over the limit, still being read
        self._long_len = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _following(self) -> tuple[int, Path] | None:
        """The segment to read after the open one; before any, the one holding ``start``."""
        segs = segments(self.path)
        if self._file is None:
            holding = [s for s in segs if s[0] <= self.start]
            return holding[-1] if holding else (segs[0] if segs else None)
        return next((s for s in segs if s[0] > self._base), None)

    def _open(self, base: int, path: Path) -> None:
        if self._file is not None and base != self._line:
            log.warning("partition %s: segment %s starts at offset %d, not %d (gap or overlap)",
                        self.name, path.name, base, self._line)  # fmt: skip
        self.close()
        self._base, self._line, self._rest, self._long = base, base, b"", None
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()

    def read(self) -> Chunk | None:
        """The next lines (at most about ``READ_SIZE`` bytes), or None if none are ready."""
        if self._file is None and (first := self._following()) is not None:
            self._open(*first)
        data = self._file.read(READ_SIZE) if self._file is not None else b""
        rolled = None
        if not data:
            rolled = self._following() if self._file is not None else None
            if rolled is None:
                self.at_end = True
                return None
            data = self._file.read(READ_SIZE)  # type: ignore[union-attr] # written before the roll
            rolled = None if data else rolled
        self.at_end = False
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        if rolled is not None and (self._rest or self._long is not None):
            lines.append(self._rest)  # the last line of a finished segment is whole
            self._rest = b""
        chunk = self._chunk(lines)
        if rolled is not None:
            self._open(*rolled)
        return chunk

    def _chunk(self, lines: list[bytes]) -> Chunk | None:
        chunk = Chunk("")
        limit = self.max_line_bytes
        if self._long is not None:
            tail = lines.pop(0) if lines else self._rest
            self._long_len += len(tail)
            self._long += tail[: max(0, defaults.DEAD_LETTER_KEEP_BYTES - len(self._long))]
            if not lines and tail is self._rest:
                self._rest = b""
                return None  # still inside the long line
            chunk.reject(too_long(bytes(self._long), limit, self._long_len))
            self._long = None
        if lines and (limit < READ_SIZE or len(lines[0]) > limit):
            # Only the first line can be longer than one read, unless the limit is
            # below a read: with the default limit, one length check per read.
            split_lines(lines, chunk, limit)
        elif chunk.lines:
            chunk.lines += lines
        else:
            chunk.lines = lines
        if len(self._rest) > limit:
            self._long, self._long_len, self._rest = bytearray(self._rest), len(self._rest), b""
        first = self._line
        self._line += len(chunk.lines)
        skip = max(0, self.start - first)  # resuming inside a segment
        if skip >= len(chunk.lines):
            return None
        self.next_offset = self._line
        if skip:
            chunk.lines = chunk.lines[skip:]
            chunk.rejects = {i - skip: r for i, r in chunk.rejects.items() if i >= skip}
        chunk.first_offset = first + skip
        return chunk


class LineCounter:
    """How many complete lines a partition holds (its end offset), counted
    incrementally: only the bytes the last segment gained since the last count."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seg: Path | None = None
        self._size = 0
        self._lines = 0

    def end(self) -> int:
        segs = segments(self.path)
        if not segs:
            return 0
        base, last = segs[-1]
        if last != self._seg:
            self._seg, self._size, self._lines = last, 0, 0
        try:
            with open(last, "rb") as f:
                f.seek(self._size)
                while block := f.read(1 << 20):
                    self._lines += block.count(b"\n")
                    self._size += len(block)
        except FileNotFoundError:
            pass
        return base + self._lines


@dataclass
class Owned:
    """A partition this worker holds the lock of."""

    lock: Lock
    reader: PartitionReader
    counter: LineCounter
    committed: int
    end: int | None = None
    held: bool = False
    """Revoked, but read to its end: kept until our final commit, so the next owner
    starts after it instead of counting our unsafe events twice."""


class FileSource(ThreadedSource):
    """A topic on disk, read by one member of a consumer group (see the module docstring).

    Args:
        name: the ``--source`` text, unique in the run.
        path: the topic directory or single ``.jsonl`` file.
        process: this worker (Redis connection, id, liveness of the others).
        group: the consumer group; committed offsets are kept per group.
        follow: tail the partitions forever instead of ending at their end.
        start_from: ``committed``, or ``earliest`` to read each partition this worker
            takes from its first line, whatever was committed.
    """

    def __init__(
        self, name: str, path: Path, process: Process, group: str, follow: bool, start_from: str
    ) -> None:
        super().__init__()
        if not path.exists():
            raise SourceError(f"{name}: no such file or directory")
        self.name = name
        self.path = path
        self.process = process
        self.group = group
        self.follow = follow
        self.earliest = start_from == "earliest"
        keys = process.keys
        self._offsets_key = keys.offsets(group, name)
        self._info_key = keys.source_info(group, name)
        self._owners_key = keys.members(group, name)
        self._group = Group(process, keys.consumers(group, name))
        self._owned: dict[str, Owned] = {}
        self._read_to: dict[str, int] = {}
        """Per partition read earlier in this run: where we stopped (see ``_take``)."""
        self._me: str | None = None
        """The process id the reading thread reads under (``_started_as``)."""
        self._mutex = threading.Lock()  # _owned is shared with commit() on the main thread

    # -- the Source protocol --------------------------------------------------------

    def commit(self, partition: str, offset: int) -> None:
        """Write the committed offset, if we still own the partition and it moves forward.

        Any value the run loop commits is true (everything below it is safe); the
        ownership check only keeps a former owner from moving the offset back
        over what the new owner has committed since (which would re-read, not lose).
        """
        with self._mutex:
            own = self._owned.get(partition)
            if own is None or offset <= own.committed:
                return
            info = self._info(own, committed=offset)
        try:
            pipe = self.process.client.pipeline(transaction=False)
            pipe.hset(self._offsets_key, partition, offset)
            pipe.hset(self._info_key, partition, info)
            pipe.execute()
        except redis.RedisError as e:  # the run goes on; the next commit says it again
            log.warning("%s: committing %s failed (%s); retrying", self.name, partition, e)
            return
        own.committed = max(own.committed, offset)

    # -- the reading thread ---------------------------------------------------------

    def _run(self, out: queue.Queue[Chunk]) -> None:
        tick_s = min(1.0, self.process.heartbeat_interval_s)
        try:
            self._read(out, tick_s)
        except Exception:  # noqa: BLE001 - end the source, not the run: nothing unsafe is committed
            log.exception("%s: reading failed; this source stops", self.name)
        self._group.leave()
        put_or_tick(out, Chunk(self.name, end=True), self._stop, tick_s, self._hold)
        while self._owned:  # until process.stop() releases them: then extend fails
            time.sleep(tick_s)
            self._hold()

    def _read(self, out: queue.Queue[Chunk], tick_s: float) -> None:
        """Read the owned partitions in turn, one chunk each, until stopped or (without
        ``--follow``) every partition assigned to us is read to its end."""
        next_tick = 0.0
        while not self._stop.is_set():
            if self.process.id != self._me:
                self._started_as(self.process.id)
            if time.monotonic() >= next_tick:
                if self._tick_safely() and not self.follow:
                    return
                next_tick = time.monotonic() + tick_s
            progressed = False
            for name in list(self._owned):
                own = self._owned.get(name)
                if own is None or own.held:
                    continue
                chunk = own.reader.read()
                if chunk is not None:
                    chunk.source, chunk.partition, chunk.owner = self.name, name, self._me
                    put_or_tick(out, chunk, self._stop, tick_s, self._tick_safely)
                    progressed = True
            if not progressed:
                if not self.follow:  # perhaps done: check soon, not a whole tick later
                    next_tick = min(next_tick, time.monotonic() + 2 * IDLE_WAIT_S)
                self._stop.wait(IDLE_WAIT_S)

    def _started_as(self, me: str) -> None:
        """Read under process id ``me`` from now on. After a fence, start afresh: let
        go of every partition and forget where we were (see the module docstring)."""
        if self._me is not None:
            for name in list(self._owned):
                own = self._owned[name]
                try:
                    self._drop(name)
                    own.lock.release()
                except (LockNotOwned, redis.RedisError):
                    pass  # expired while we were paused, or Redis away: it expires
            self._read_to.clear()
            self.earliest = False  # what a replay from the start committed stays
            log.warning(
                "%s: reading as %s, every partition from its committed offset", self.name, me
            )
        self._me = me

    def _tick_safely(self) -> bool:
        """One round of group upkeep; a Redis hiccup is logged and retried next tick."""
        try:
            return self._tick()
        except redis.RedisError as e:
            log.warning("%s: group upkeep failed (%s); retrying", self.name, e)
        except Exception:  # noqa: BLE001 - the reading thread must not die of it
            log.exception("%s: group upkeep failed; retrying", self.name)
        return False

    def _tick(self) -> bool:
        """Rejoin the group, extend our locks, follow the assignment, publish lag.

        Returns:
            Whether every partition assigned to us is owned and read to its end.
        """
        me = self.process.id
        live = self._group.refresh()
        self._extend()
        parts = sorted(discover(self.path).items(), key=lambda kv: _natural(kv[0]))
        current: dict[str, str] = self.process.client.hgetall(self._owners_key)  # type: ignore[assignment]
        owners = {p: o for p, o in current.items() if o in live}
        owners.update({p: me for p in self._owned})
        plan = assign([p for p, _ in parts], sorted(live), owners)
        mine = set(plan.get(me, []))
        for name in [n for n in self._owned if n not in mine and not self._owned[n].held]:
            self._revoke(name)
        done = True
        for name, path in parts:
            if name in mine and name not in self._owned:
                done = False
                self._take(name, path)
            elif name in mine:
                self._owned[name].held = False
                done = done and self._owned[name].reader.at_end
        if done and not self.follow:
            others = [m for m, ps in plan.items() if ps and m != me]
            done = not self._group.silent(others, self.name, "partition owner(s)")
        self._publish()
        return done

    def _take(self, name: str, path: Path) -> None:
        key = self.process.keys.source_lock(self.group, self.name, name)
        lock = self.process.make_lock(key, block=False)
        lock.ttl_ms = self.process.process_ttl_ms
        try:
            lock.acquire()
        except AlreadyLocked:  # its last owner has not let go yet: next tick
            return
        committed = int(self.process.client.hget(self._offsets_key, name) or 0)
        # Taken back after losing it (a rebalance, or a lock that expired while Redis was
        # away): what we read before is in our cache or safe, so resume where we stopped,
        # unless someone committed further meanwhile. Not a line is skipped that nobody
        # made safe, and none we still hold is read twice.
        if name in self._read_to:
            start, floor = max(committed, self._read_to[name]), committed
        else:  # --from earliest: a replay, whose commits follow it from the start
            start = floor = 0 if self.earliest else committed
        own = Owned(
            lock, PartitionReader(name, path, start, self.max_line_bytes), LineCounter(path), floor
        )
        with self._mutex:
            self._owned[name] = own
        self.process.client.hset(self._owners_key, name, self.process.id)
        log.info("%s: reading partition %s from offset %d", self.name, name, start)

    def _revoke(self, name: str) -> None:
        own = self._owned[name]
        if not self.follow and own.reader.at_end:
            own.held = True
            return
        self._drop(name)
        try:
            own.lock.release()
        except LockNotOwned:
            pass
        log.info("%s: partition %s handed over at %d", self.name, name, own.reader.next_offset)

    def _drop(self, name: str) -> None:
        with self._mutex:
            own = self._owned.pop(name)
        own.reader.close()
        self._read_to[name] = own.reader.next_offset
        client = self.process.client
        if client.hget(self._owners_key, name) == self.process.id:
            client.hdel(self._owners_key, name)

    def _extend(self, quiet: bool = False) -> None:
        for name, own in list(self._owned.items()):
            try:
                own.lock.extend()
            except LockNotOwned:
                if not quiet:
                    log.warning("%s: lost the lock of partition %s; stop reading", self.name, name)
                self._drop(name)

    def _hold(self) -> None:
        """After the end: keep our locks until the process stops (after the final commit)."""
        try:
            self._extend(quiet=True)
        except redis.RedisError:  # the next tick retries
            log.debug("%s: extending held locks failed", self.name, exc_info=True)

    def _publish(self) -> None:
        """Lag per owned partition, for ``phonon status`` (counted outside the mutex:
        a first count of a big segment must not hold up the run loop's commit)."""
        for own in list(self._owned.values()):
            own.end = own.counter.end()
        with self._mutex:
            infos: dict[Any, bytes] = {n: self._info(o) for n, o in self._owned.items()}
        if infos:
            self.process.client.hset(self._info_key, mapping=infos)

    def _info(self, own: Owned, committed: int | None = None) -> bytes:
        return orjson.dumps({
            "committed": own.committed if committed is None else committed, "end": own.end,
            "read": own.reader.next_offset, "owner": self.process.id,
            "updated_ms": self.process.clock(),
        })  # fmt: skip


def _natural(name: str) -> tuple[str, int]:
    """``events-10`` after ``events-9``."""
    m = PARTITION.match(name)
    return (name[: m.start(1)], int(m.group(1))) if m else (name, -1)
