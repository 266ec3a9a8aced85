"""``redis-stream:KEY``: a Redis stream read through a consumer group.

Each worker is a consumer named by its process id. Redis hands each new entry
to one consumer and keeps it pending until acknowledged; we acknowledge (XACK)
only once the run loop commits it, i.e. once its aggregate is executed or
cached in Redis. Entries get consecutive local offsets (the partition is the
stream key) so the loop's watermark maps back to entry ids.

A dead worker's pending entries are claimed by a live one. Not with XAUTOCLAIM
by idle time: a live worker legitimately keeps entries pending for a whole
cache session (minutes), so "idle" cannot tell slow from dead. Instead a
survivor lists the pending entries of each consumer whose process is dead and
claims them in one script (``scripts.CLAIM_LUA``: XCLAIM takes an entry from
whoever holds it, so a claimer stalled between listing and claiming would take
back entries another claimed and counted since), under a lock so that survivors
seldom race for them, then deletes the emptied consumer.

Exactly once across a kill or a fence. A dead consumer's pending entries may
have been counted already: deposited or written, but not yet acknowledged
(acknowledging waits for the whole cache to be safe). So every deposit or write
marks, per key, the last entry id it covers of each *consumer* that delivered
its events (scripts.RELEASE_LUA's MARKS): a consumer's entries reach its one
worker in increasing id order, and that worker holds one update per key at a
time, so a key's mark says all its entries of that consumer up to there are
counted. Claimed entries are checked against the dead consumer's marks and
skipped on the keys that counted them (``Chunk.replay_of``). To keep each
consumer's entries in order, a survivor claims into a consumer of its own per
dead one (``<pid>~<n>``), never into the one it reads new entries with; a
consumer belongs to the process its name starts with. A claimer that skips an
entry marks nothing for it, so should it die in turn, its own marks do not say
the entry was counted: the consumers it was claimed from do. Each claim records
where it claims from (``Keys.stream_lineage``), and claimed entries are checked
against the marks of the whole line of consumers they went through.

A process fenced (declared dead while paused) starts over under a new id: it
reads with a new consumer, acknowledges nothing its old consumers delivered
(the run loop dropped what it held of them), and those are claimed like any
dead member's, by whoever comes first, itself included.

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

from .. import faults
from ..exceptions import AlreadyLocked, LockNotOwned, SourceError
from ..store.connection import is_cluster
from ..store.lock import Lock
from ..store.scripts import CLAIM, FENCED_ERROR
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
MARKS_TTL_MS = 604_800_000
"""Milliseconds a claim's lineage is kept: as long as the marks it points to
(scripts.RELEASE_LUA's ``seen``, 7 days)."""

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
        self._lineage_key = keys.stream_lineage(group, name)
        self._members = Group(process, keys.consumers(group, name))
        self._ids: deque[tuple[int, bytes, str]] = deque()
        """(offset, entry id, reader's process id) handed to the run loop and not yet
        acknowledged."""
        self._next = 0
        self._mutex = threading.Lock()
        self._me: str | None = None
        """The process id the reading thread reads under (``_started_as``)."""
        self._claims: dict[str, str] = {}
        """Dead consumer -> our consumer its entries are claimed into."""
        self._claim_busy = False
        """The last claim found dead consumers but the claim lock taken."""

    # -- the Source protocol --------------------------------------------------------

    def commit(self, partition: str, offset: int) -> None:
        """XACK every entry below ``offset``; after the final commit, leave the group tidy."""
        me = self.process.id
        with self._mutex:
            done = []
            while self._ids and self._ids[0][0] < offset:
                done.append(self._ids.popleft())
        # Read under an id since fenced: the run loop dropped what it held of them;
        # they stay pending on the old consumer, to be claimed and counted once.
        ids = [entry_id for _, entry_id, reader in done if reader == me]
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
        next_tick = 0.0
        ready = False
        while not self._stop.is_set():
            me = self.process.id
            if me != self._me:
                self._started_as(me)
            try:
                if not ready:
                    self._members.refresh(prune=False)  # a member before any entry is ours
                    self._create_group()
                    ready = True
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + tick_s
                    claimed, names = self._claim(client)
                    self._emit(out, claimed, tick_s, names)
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
                    self._emit(out, entries, tick_s, (me, ()))
            elif not self.follow and self._at_end(out, client, tick_s):
                return

    def _at_end(self, out: queue.Queue[Chunk], client: redis.Redis, tick_s: float) -> bool:
        """Without ``--follow``, once nothing new is left: whether nothing is left to
        claim either (else claim a batch, or wait while another holds the claim lock:
        a claimer that died claiming holds it for no longer than the dead timeout),
        nor pending on another member not heard from since (``Group.silent``): one
        killed a moment ago counts as alive for three of its heartbeats, and its
        entries are ours to claim once it is dead."""
        claimed, names = self._claim(client)
        if not claimed:
            holders = self._holders()
            if not self._claim_busy and not self._members.silent(
                holders, self.name, "the owner(s) of pending entries"
            ):
                return True
            self._stop.wait(tick_s)
        self._emit(out, claimed, tick_s, names)
        return False

    def _started_as(self, me: str) -> None:
        """Read under process id ``me`` from now on: a new consumer (after a fence,
        the old ones are a dead member's, claimed by whoever comes first)."""
        if self._me is not None:
            log.warning(
                "%s: reading as consumer %s; what consumer %s delivered is claimed as a "
                "dead member's and counted once",
                self.name,
                me,
                self._me,
            )
        self._me = me
        self._claims = {}

    def _create_group(self) -> None:
        client = self.process.client
        try:
            client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
            if self.earliest:
                client.xgroup_setid(self.key, self.group, id="0")

    def _emit(
        self,
        out: queue.Queue[Chunk],
        entries: list[Any],
        tick_s: float,
        names: tuple[str, tuple[str, ...]],
    ) -> None:
        """Number the entries and hand them to the run loop as one chunk.

        Args:
            names: the consumer that delivered them (whose marks they take) and,
                for claimed entries, the dead consumer they were claimed from and
                those its entries came from before (whose marks they are checked
                against).
        """
        if not entries:
            return
        me = self._me
        assert me is not None
        sequence, replay_of = names
        with self._mutex:
            chunk = Chunk(self.name, partition=self.key, first_offset=self._next, owner=me)
            chunk.sequence, chunk.replay_of, chunk.ids = sequence, replay_of, []
            for entry_id, fields in entries:
                self._add(chunk, entry_id, fields)
                chunk.ids.append(entry_id.decode())
                self._ids.append((self._next, entry_id, me))
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

    def _claim(self, client: redis.Redis) -> tuple[list[Entry], tuple[str, tuple[str, ...]]]:
        """Claim one batch of the pending entries of a dead consumer, under the claim
        lock; returns them with (our consumer they went to, the dead one and the
        consumers its entries came from before)."""
        none: tuple[list[Entry], tuple[str, tuple[str, ...]]] = ([], ("", ()))
        self._claim_busy = False
        self._members.refresh(prune=False)
        dead = self._dead_consumers()
        if not dead:
            return none
        # Its TTL is the dead timeout, as a file partition's lock: a claim takes
        # milliseconds, and a claimer killed while claiming holds up no one longer.
        lock = Lock(
            self.process.client, self._claim_key, block=False, ttl_ms=self.process.process_ttl_ms
        )
        try:
            lock.acquire()
        except AlreadyLocked:
            self._claim_busy = True
            return none
        try:
            for consumer in dead:
                target = self._claims.get(consumer) or f"{self._me}~{len(self._claims) + 1}"
                faults.point("before-claim")
                found = self._claim_from(client, consumer, target)
                if found is None:  # nothing pending: the consumer is deleted
                    self._members.forget([consumer])
                    continue
                self._claims[consumer] = target
                log.info(
                    "%s: claimed %d pending entries of dead consumer %s",
                    self.name,
                    len(found),
                    consumer,
                )
                return found, (target, self._lineage(consumer))
            return none
        except redis.ResponseError as e:
            if FENCED_ERROR not in str(e):
                raise
            log.info("%s: declared dead while claiming; claims again under its new id", self.name)
            return none
        finally:
            try:
                lock.release()
            except LockNotOwned:
                pass

    def _claim_from(self, client: redis.Redis, consumer: str, target: str) -> list[Entry] | None:
        """Claim up to ``READ_COUNT`` entries pending on dead ``consumer`` into our
        ``target``, listed and claimed in one step (scripts.CLAIM_LUA); None if it had
        none (it is deleted).

        On one server the step also checks that we are still registered (FENCED
        otherwise) and records where ``target``'s entries come from (the lineage).
        On a Redis Cluster the stream, the lineage and the registry are in three
        slots, and the step holds the stream's key only. The lineage is written
        just before it: a line recorded for a claim that then finds nothing is
        never read. Without the fence check it is still sound: the step takes only
        what is pending on the dead consumer at that instant, which no other
        claimer has taken, and nobody reads as a dead consumer (its process never
        registers again under that id). A claimer declared dead between the two
        steps claims into a consumer of a dead process, from which the next claimer
        takes them, checked against the line through it; its own run loop drops
        what it read under the old id.
        """
        keys = [self.key]
        if is_cluster(client):
            if self._claims.get(consumer) != target:
                pipe = self.process.client.pipeline(transaction=False)
                pipe.hset(self._lineage_key, target, consumer)  # before any is ours
                pipe.pexpire(self._lineage_key, MARKS_TTL_MS)
                pipe.execute()
        else:
            keys += [self._lineage_key, self.process.keys.processes]
        assert self._me is not None
        args: list[str | int] = [self.group, consumer, target, READ_COUNT, self._me, MARKS_TTL_MS]
        reply: Any = CLAIM(keys=keys, args=args, client=client)
        if not reply[0]:
            return None
        return [(e[0], dict(zip(e[1][::2], e[1][1::2], strict=True))) for e in reply[1:]]

    def _lineage(self, consumer: str) -> tuple[str, ...]:
        """``consumer``, then the consumers its entries were claimed from, in turn."""
        parents: dict[str, str] = self.process.client.hgetall(self._lineage_key)  # type: ignore[assignment]
        line = [consumer]
        while line[-1] in parents and parents[line[-1]] not in line:
            line.append(parents[line[-1]])
        return tuple(line)

    def _holders(self) -> list[str]:
        """The other processes with entries pending on a consumer of theirs."""
        try:
            consumers = self.process.client.xinfo_consumers(self.key, self.group)
        except redis.ResponseError:  # no group yet
            return []
        owners = {c["name"].partition("~")[0] for c in consumers if c["pending"]}
        return sorted(owners - {self._me})

    def _dead_consumers(self) -> list[str]:
        """The group's consumers whose process (the id their name starts with) is dead."""
        try:
            consumers = self.process.client.xinfo_consumers(self.key, self.group)
        except redis.ResponseError:  # no group yet
            return []
        owners = {c["name"]: c["name"].partition("~")[0] for c in consumers}
        others = set(owners.values()) - {self._me}
        live = self.process.live_processes(others) if others else set()
        return sorted(n for n, owner in owners.items() if owner in others - live)

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
        """Delete our consumers with nothing pending; once none is left, leave the group."""
        client = self.process.client
        me = self.process.id
        try:
            left = 0
            for consumer in client.xinfo_consumers(self.key, self.group):
                name = consumer["name"]
                if name.partition("~")[0] != me:
                    continue
                if consumer["pending"]:
                    left += 1
                else:
                    client.xgroup_delconsumer(self.key, self.group, name)
            if not left:
                self._members.forget([me])
            self._publish()
        except redis.RedisError:
            log.debug(
                "%s: leaving the group failed; a survivor tidies up", self.name, exc_info=True
            )
