"""``redis-stream:KEY``: a Redis stream read through a consumer group.

Each worker is a consumer named by its process id. Redis hands each new entry
to one consumer and keeps it pending until acknowledged; we acknowledge (XACK)
only once the run loop commits it, i.e. once its aggregate is executed or
cached in Redis. Entries get consecutive local offsets (the partition is the
stream key) so the loop's watermark maps back to entry ids.

A dead worker's pending entries are claimed by a live one. Not with XAUTOCLAIM
by idle time: a live worker legitimately keeps entries pending for a whole
cache session (minutes), so "idle" cannot tell slow from dead. Instead a
survivor lists the pending entries of each group member whose process is dead
(XPENDING per consumer) and XCLAIMs them, under a lock so that two survivors
never claim the same entries, then deletes the emptied consumer.

``KEY?field=NAME`` reads the event from field NAME (default ``data``);
``KEY?field=*`` makes the whole entry (field -> string) the event.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import urllib.parse
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson
import redis

from ..exceptions import AlreadyLocked, LockNotOwned, SourceError
from ..store.lock import Lock
from .base import Chunk, Group, Reject, ThreadedSource, bytes_client, put_or_tick, too_long

if TYPE_CHECKING:
    from ..core.process import Process

log = logging.getLogger(__name__)

READ_COUNT = 1000
"""Entries per XREADGROUP (and per XCLAIM): one chunk."""
BLOCK_MS = 100
"""Milliseconds an XREADGROUP waits for new entries before upkeep (and noticing a stop)."""
ACK_BATCH = 1000
"""Entry ids per XACK."""

Entry = tuple[bytes, "dict[bytes, bytes]"]


def parse_spec(rest: str) -> tuple[str, str]:
    """``KEY[?field=NAME]`` -> (key, field).

    Raises:
        SourceError: for an option other than ``field``.
    """
    key, sep, query = rest.rpartition("?")
    if not sep or "=" not in query:
        return rest, "data"
    options = urllib.parse.parse_qs(query, keep_blank_values=True)
    unknown = set(options) - {"field"}
    if unknown or not key:
        raise SourceError(
            f"redis-stream:{rest}: unknown option {sorted(unknown)!r} (use ?field=NAME or ?field=*)"
        )
    return key, options["field"][-1] or "data"


class StreamSource(ThreadedSource):
    """A consumer of a group on one stream (see the module docstring).

    Args:
        name: the ``--source`` text, unique in the run.
        rest: ``KEY`` or ``KEY?field=NAME``.
        process: this worker; its id names the consumer.
        group: the consumer group, created (from the stream's start) if missing.
        start_from: ``earliest`` moves the group back to the stream's start first.
        follow: wait for new entries; without it, end once nothing is left to read
            or to claim from dead members (like ``file:`` without ``--follow``).
    """

    def __init__(
        self,
        name: str,
        rest: str,
        process: Process,
        group: str,
        start_from: str,
        follow: bool = True,
    ) -> None:
        super().__init__()
        self.follow = follow
        self.name = name
        self.key, field = parse_spec(rest)
        self.field = None if field == "*" else field.encode()
        self.process = process
        self.group = group
        self.earliest = start_from == "earliest"
        keys = process.keys
        self._info_key = keys.source_info(group, name)
        self._claim_key = keys.source_lock(group, name, "claim")
        self._members = Group(process, keys.consumers(group, name))
        self._ids: deque[tuple[int, bytes]] = deque()
        """(offset, entry id) handed to the run loop and not yet acknowledged."""
        self._next = 0
        self._mutex = threading.Lock()

    # -- the Source protocol --------------------------------------------------------

    def commit(self, partition: str, offset: int) -> None:
        """XACK every entry below ``offset``; after the final commit, leave the group tidy."""
        with self._mutex:
            done = []
            while self._ids and self._ids[0][0] < offset:
                done.append(self._ids.popleft())
        ids = [entry_id for _, entry_id in done]
        try:
            pipe = self.process.client.pipeline(transaction=False)
            for i in range(0, len(ids), ACK_BATCH):
                pipe.xack(self.key, self.group, *ids[i : i + ACK_BATCH])
            pipe.execute()
        except redis.RedisError as e:
            log.warning("%s: acknowledging failed (%s); retrying at the next commit", self.name, e)
            with self._mutex:
                self._ids.extendleft(reversed(done))
            return
        thread = self._thread
        if self._stop.is_set() and thread is not None:
            thread.join(timeout=1.0)
            if not thread.is_alive() and not self._ids:
                self._leave()

    # -- the reading thread ---------------------------------------------------------

    def _run(self, out: queue.Queue[Chunk]) -> None:
        tick_s = min(1.0, self.process.heartbeat_interval_s)
        client = bytes_client(self.process)
        try:
            self._read(out, client, tick_s)
        except Exception:  # noqa: BLE001 - end the source, not the run: nothing unsafe is acked
            log.exception("%s: reading failed; this source stops", self.name)
        client.close()
        put_or_tick(out, Chunk(self.name, end=True), self._stop, tick_s, lambda: None)

    def _read(self, out: queue.Queue[Chunk], client: redis.Redis, tick_s: float) -> None:
        """Claim what dead members left pending, then read new entries, until stopped."""
        me = self.process.id
        next_tick = 0.0
        ready = False
        while not self._stop.is_set():
            try:
                if not ready:
                    self._members.refresh(prune=False)  # a member before any entry is ours
                    self._create_group()
                    ready = True
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + tick_s
                    self._emit(out, self._claim(client), tick_s)
                    self._publish()
                reply: Any = client.xreadgroup(
                    self.group, me, {self.key: ">"}, count=READ_COUNT, block=BLOCK_MS
                )
            except redis.ResponseError as e:
                if "NOGROUP" in str(e):
                    log.warning("%s: group %s vanished; creating it again", self.name, self.group)
                    ready = False
                else:
                    log.error("%s: %s; retrying", self.name, e)
                    self._stop.wait(tick_s)
                continue
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("%s: connection lost (%s); retrying", self.name, e)
                self._stop.wait(tick_s)
                continue
            if reply:
                for _stream, entries in reply:
                    self._emit(out, entries, tick_s)
            elif not self.follow:
                leftover = self._claim(client)
                if not leftover:
                    return  # read to the end, and no dead member's entries to take over
                self._emit(out, leftover, tick_s)

    def _create_group(self) -> None:
        client = self.process.client
        try:
            client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
            if self.earliest:
                client.xgroup_setid(self.key, self.group, id="0")

    def _emit(self, out: queue.Queue[Chunk], entries: list[Any], tick_s: float) -> None:
        """Number the entries and hand them to the run loop as one chunk."""
        if not entries:
            return
        with self._mutex:
            chunk = Chunk(self.name, partition=self.key, first_offset=self._next)
            for entry_id, fields in entries:
                self._add(chunk, entry_id, fields)
                self._ids.append((self._next, entry_id))
                self._next += 1
        put_or_tick(out, chunk, self._stop, tick_s, self._upkeep)

    def _add(self, chunk: Chunk, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """One entry, one line, one offset: a line of its own or a reject."""
        if self.field is None:
            line = orjson.dumps(
                {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
            )
        elif self.field in fields:
            line = fields[self.field].replace(b"\n", b" ")
        else:
            raw = orjson.dumps({k.decode(errors="replace"): v.decode(errors="replace")
                                for k, v in fields.items()})  # fmt: skip
            reason = (
                f"entry {entry_id.decode()} has no field {self.field.decode(errors='replace')!r}"
            )
            chunk.reject(Reject(raw, reason))
            return
        if len(line) > self.max_line_bytes:
            chunk.reject(too_long(line, self.max_line_bytes))
        else:
            chunk.lines.append(line)

    def _upkeep(self) -> None:
        """While the queue is full: stay a member and keep status current."""
        try:
            self._members.refresh(prune=False)
            self._publish()
        except redis.RedisError:
            log.debug("%s: upkeep failed", self.name, exc_info=True)

    def _claim(self, client: redis.Redis) -> list[Entry]:
        """Claim one batch of the pending entries of dead members, under the claim lock."""
        self._members.refresh(prune=False)
        if not self._members.dead:
            return []
        lock = Lock(self.process.client, self._claim_key, block=False)
        try:
            lock.acquire()
        except AlreadyLocked:
            return []
        try:
            for consumer in sorted(self._members.dead):
                pending = client.xpending_range(
                    self.key, self.group, min="-", max="+", count=READ_COUNT, consumername=consumer
                )
                if not pending:
                    client.xgroup_delconsumer(self.key, self.group, consumer)
                    self._members.forget([consumer])
                    continue
                ids: list[Any] = [p["message_id"] for p in pending]
                claimed: Any = client.xclaim(
                    self.key, self.group, self.process.id, min_idle_time=0, message_ids=ids
                )
                found = [(i, f) for i, f in claimed if f is not None]
                gone = set(ids) - {i for i, _ in found}
                if gone:  # deleted from the stream while pending: nothing left to count
                    client.xack(self.key, self.group, *gone)
                log.info(
                    "%s: claimed %d pending entries of dead consumer %s",
                    self.name,
                    len(found),
                    consumer,
                )
                return found
            return []
        finally:
            try:
                lock.release()
            except LockNotOwned:
                pass

    def _publish(self) -> None:
        """Pending and lag of the group, for ``phonon status``."""
        client = self.process.client
        try:
            groups = client.xinfo_groups(self.key)
        except redis.ResponseError:
            return
        info = next((g for g in groups if g["name"] == self.group), None)
        if info is None:
            return
        lag = info.get("lag")
        if lag is None and "entries-read" not in info:  # Redis < 7: only "caught up or not"
            last = client.xinfo_stream(self.key).get("last-generated-id")
            lag = 0 if last == info["last-delivered-id"] else None
        client.hset(
            self._info_key,
            self.key,
            orjson.dumps(
                {
                    "pending": info["pending"],
                    "lag": lag,
                    "last_delivered_id": info["last-delivered-id"],
                    "consumers": info["consumers"],
                    "updated_ms": self.process.clock(),
                }
            ),
        )

    def _leave(self) -> None:
        """Delete our consumer (once nothing is pending on it) and leave the group."""
        client = self.process.client
        try:
            if not client.xpending_range(
                self.key, self.group, min="-", max="+", count=1, consumername=self.process.id
            ):
                client.xgroup_delconsumer(self.key, self.group, self.process.id)
                self._members.forget([self.process.id])
            self._publish()
        except redis.RedisError:
            log.debug(
                "%s: leaving the group failed; a survivor tidies up", self.name, exc_info=True
            )
