"""The run loop: read events, route them, merge them in the LRU cache, and take
and leave references in batches so that no event costs a Redis round trip.

Timeline of one key in one worker::

    event for k, k not cached  -> build Update(acquire=False), cache it, queue "acquire k"
    more events for k          -> merged into the cached Update in memory (no Redis)
    k evicted / expired        -> queue "release k"
    batch full or 50 ms old    -> one pipeline: release what left (deposit or take),
                                  then acquire what arrived; execute what was taken

Taking a reference up to one batch late is safe: another worker may then find
itself last and execute without our partial, and we execute ours later. Totals
stay exact; only the number of writes grows.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, Any, Protocol

import orjson
import redis

from .. import defaults
from ..core.cache import LruCache
from ..core.process import Process
from ..core.reference import Mode
from ..core.update import Update, end_sessions, resource_name, send_end_sessions
from ..exceptions import EventError, Fenced
from ..poison import spec_problem
from ..routing.codegen import LinesMerger, Merger
from ..routing.fields import skipped_nulls
from ..routing.routes import Route, Routed, Router
from ..sources import Chunk, Source
from .deadletters import DeadLetters
from .offsets import Watermarks
from .tally import SourceTally

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    max_entries: int = defaults.MAX_ENTRIES
    soft_session_s: float | None = defaults.SOFT_SESSION_S
    hard_session_s: float | None = defaults.HARD_SESSION_S
    dead_letter: str | None = None
    batch_max_keys: int = defaults.BATCH_MAX_KEYS
    batch_max_age_s: float = defaults.BATCH_MAX_AGE_S
    progress: bool = False


NULLS = "nulls_skipped:"
"""Prefix of a route's skipped-nulls count among a worker's reported figures."""

COUNTS = (
    "events_read",
    "routed",
    "unmatched",
    "dead_lettered",
    "keys_executed",
    "keys_cached",
    "execute_failures",
    "keys_quarantined",
)
"""The ``RunStats`` counts a worker reports and a ``--workers`` parent adds up."""


@dataclass
class RunStats:
    """What a run did; printed as the summary and published for ``phonon status``."""

    events_read: int = 0
    routed: int = 0
    unmatched: int = 0
    dead_lettered: int = 0
    keys_executed: int = 0
    keys_cached: int = 0
    execute_failures: int = 0
    keys_quarantined: int = 0
    """Aggregates set aside because their write can never succeed (``phonon quarantine``)."""
    nulls_skipped: dict[str, int] = field(default_factory=dict)
    """Route (``routes[i]``) -> null values its fields skipped (SQL's rule)."""
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def figures(self, entries: int = 0) -> dict[str, int]:
        """The counts, for a ``--workers`` parent to add up (``run.workers``)."""
        return {
            **{name: getattr(self, name) for name in COUNTS},
            "entries": entries,
            **{f"{NULLS}{route}": n for route, n in self.nulls_skipped.items()},
        }

    @classmethod
    def added_up(cls, figures: dict[str, int], started: float) -> RunStats:
        """The stats of several workers together, timed from ``started`` (monotonic)."""
        nulls = {k[len(NULLS) :]: int(n) for k, n in figures.items() if k.startswith(NULLS)}
        return cls(
            **{n: int(figures.get(n, 0)) for n in COUNTS}, nulls_skipped=nulls, started=started
        )

    def progress(self, entries: int) -> str:
        """The progress line: what was read and how fast, what is cached and written."""
        rate = self.events_read / self.elapsed_s if self.elapsed_s else 0
        return (
            f"{self.events_read:,} events ({rate:,.0f}/s), {entries:,} keys cached, "
            f"{self.keys_executed:,} executed, {self.dead_lettered:,} dead-lettered"
        )

    def summary(self) -> str:
        elapsed = self.elapsed_s
        rate = self.events_read / elapsed if elapsed > 0 else 0.0
        text = (
            f"events read {self.events_read}, routed {self.routed}, unmatched {self.unmatched}, "
            f"dead-lettered {self.dead_lettered}; keys executed {self.keys_executed}, "
            f"cached {self.keys_cached}; {elapsed:.2f}s, {rate:,.0f} events/s"
        )
        if self.execute_failures:
            text += f"; {self.execute_failures} executes failed (aggregates kept in redis)"
        if self.keys_quarantined:
            text += (
                f"; {self.keys_quarantined} quarantined: their write can never succeed as they"
                " are (see 'phonon quarantine list')"
            )
        skipped = [f"{route} {n}" for route, n in self.nulls_skipped.items() if n]
        if skipped:
            text += f"; nulls skipped: {', '.join(skipped)}"
        return text


class Batcher:
    """Collects references to take and sessions to end; sends them in one round trip."""

    def __init__(
        self,
        process: Process,
        max_keys: int,
        max_age_s: float,
        on_fenced: Fenced_ | None = None,
    ) -> None:
        self.process = process
        self.on_fenced = on_fenced
        """Called with the batch's releases when Redis refused it because this process
        was declared dead: starts over under a new id and returns the releases to send
        again and every update to take references on again."""
        self.max_keys = max_keys
        self.max_age_s = max_age_s
        self.acquire: list[Update] = []
        self.release: list[Update] = []
        self.first_at: float | None = None
        self.mode: Mode | None = None
        """None: execute as last holder; "cache": deposit everything (fast shutdown)."""
        self.in_flight: tuple[Callable[[], list[Update]], list[Update], Mode | None] | None = None
        """The batch sent whose reply is not read yet: its reply reader, releases, mode."""
        self.alone = [0, 0]
        """Of the last batch's releases tried the sole holder's way, how many, and how
        many were not left so (``send_end_sessions``)."""
        self._batches = 0
        self.sent_at = 0.0
        """When it was sent (monotonic)."""

    def __len__(self) -> int:
        return len(self.acquire) + len(self.release)

    def add_acquire(self, update: Update) -> None:
        self.acquire.append(update)
        self._added()

    def add_release(self, updates: Sequence[Update]) -> None:
        self.release.extend(updates)
        self._added()

    def _added(self) -> None:
        if self.first_at is None:
            self.first_at = time.monotonic()
        if len(self) >= self.max_keys:
            self.send()

    def due(self, now: float) -> bool:
        return self.first_at is not None and now - self.first_at >= self.max_age_s

    def send(self, mode: Mode | None = None) -> None:
        """Send the batch, once the one in flight is answered (``wait``); its own reply
        is read by the next ``send`` or ``wait``, so that the run loop handles the
        next events while Redis runs it. A key acquired and released within it
        needs no reference."""
        self.wait()
        if not len(self):
            return
        leaving = {id(u) for u in self.release}
        acquire = [u for u in self.acquire if id(u) not in leaving]
        release = self.release
        self.acquire, self.release, self.first_at = [], [], None
        mode = mode or self.mode
        try:
            reply = send_end_sessions(release, mode, acquire, self._alone())
            self.in_flight = (reply, release, mode)
            self.sent_at = time.monotonic()
        except Fenced:  # refused before the batch was sent (a quarantine)
            if self.on_fenced is None:
                raise
            self._resend(release, mode)

    def wait(self) -> None:
        """Read the reply of the batch in flight, and execute what it took."""
        if self.in_flight is None:
            return
        reply, release, mode = self.in_flight
        self.in_flight = None
        try:
            missed = reply()
        except Fenced:
            if self.on_fenced is None:
                raise
            self._resend(release, mode)
            return
        if missed:  # others hold them, or left partials: the full way
            try:
                end_sessions(missed, mode=mode)
            except Fenced:
                if self.on_fenced is None:
                    raise
                self._resend(missed, mode)  # the rest of the batch was applied
        Watermarks.sent(release)

    def _alone(self) -> list[int] | None:
        """Whether to try this batch's releases the sole holder's way first: while
        it leaves most of them (a worker alone on its keys); else once in 16
        batches, to notice when it would again. Fresh counts, or None."""
        tried, missed = self.alone
        self._batches += 1
        if tried and 2 * missed > tried and self._batches % 16:
            return None
        self.alone = [0, 0]
        return self.alone

    def _resend(self, release: list[Update], mode: Mode | None) -> None:
        """After Redis refused a batch because this process was declared dead."""
        assert self.on_fenced is not None
        # Nothing of the batch was applied (see release_many): send it again, under
        # the new id, with what left the cache since, and a reference on every key
        # still cached (the acquires queued since among them).
        release += self.release
        self.acquire, self.release, self.first_at = [], [], None
        kept, acquire = self.on_fenced(release)
        end_sessions(kept, mode=mode, acquire=acquire)
        Watermarks.sent(release)


Fenced_ = Callable[[list[Update]], "tuple[list[Update], list[Update]]"]
"""``Batcher.on_fenced``: releases of the refused batch -> (releases to send, acquires)."""


class _Ticks:
    """When each periodic task of the loop is next due (monotonic seconds)."""

    def __init__(self, now: float) -> None:
        self.purge = now + defaults.PURGE_INTERVAL_S
        self.commit = now + defaults.COMMIT_INTERVAL_S
        self.progress = now + defaults.PROGRESS_INTERVAL_S


class FlushRequest(Protocol):
    def matches(self, resource: str) -> bool: ...

    def ack(self, expired: int) -> None: ...


class FlushInbox(Protocol):
    """Requests from ``phonon flush``, delivered to the run loop between chunks."""

    def poll(self) -> list[FlushRequest]: ...

    def close(self) -> None: ...


class Runner:
    """One ``phonon run``: sources in, routed updates through the cache, executes out."""

    def __init__(
        self,
        process: Process,
        router: Router,
        sources: Sequence[Source],
        options: RunOptions,
        progress: Callable[[str], None] | None = None,
        control: FlushInbox | None = None,
        report: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        self.process = process
        self.router = router
        self.sources = list(sources)
        self.options = options
        self.stats = RunStats()
        self.batcher = Batcher(
            process, options.batch_max_keys, options.batch_max_age_s, on_fenced=self._start_over
        )
        self.cache = LruCache(options.max_entries, end_sessions=self.batcher.add_release)
        self.watermarks = Watermarks(options.max_entries)
        self.dead = DeadLetters(options.dead_letter)
        self.queue: queue.Queue[Chunk] = queue.Queue(maxsize=defaults.QUEUE_CHUNKS)
        self.signals = 0
        self._progress = progress
        self._report = report
        """Called with this worker's figures at each publish (a ``--workers`` worker)."""
        self.control = control
        # Keyed by id(route): hashing the frozen Route dataclass per event cost ~15% of the loop.
        self._info = {
            id(r): (r.update.merge_event, _triggers(r), i) for i, r in enumerate(router.routes)
        }
        self.route_names = [f"routes[{i}]" for i in range(len(router.routes))]
        """The routes as the config names them (the ``route`` label of metrics)."""
        self.tallies = {s.name: SourceTally.for_routes(len(router.routes)) for s in self.sources}
        """Per source: what ``_handle`` counted, for ``--metrics`` (``run.tally``)."""
        self._hits: list[int] = []
        """The current chunk's source's events per route (``SourceTally.routed``)."""
        self._single_route = len(router.routes) == 1
        self._merge: Merger | None = None
        """The one route's merger for cached keys (None: every event takes ``_insert``)."""
        self._merge_lines: LinesMerger | None = None
        """The same for runs of raw lines (parsing included), when the route allows."""
        if self._single_route and self._info[id(router.routes[0])][1] is None:
            # With several routes an event must be checked against all before any
            # merges (one failing dead-letters it for all), so they take ``_insert``.
            self._merge = router.routes[0].merger(*self.cache.hot_path())
            self._merge_lines = router.routes[0].lines_merger(*self.cache.hot_path())
        self._fields = [(f"routes[{i}]", r.fields) for i, r in enumerate(router.routes) if r.fields]
        """The routes with fields, named as in the config, whose skipped nulls are counted."""
        self._read_to: dict[tuple[Source, str], int] = {}
        """Per (source, partition): the offset after the last line handled."""
        self._highest: dict[str, int] = {}
        """Per replayable partition read, its highest mark when reading (re)started."""
        self._counted: dict[int, set[str]] = {}
        """In the chunk being handled, offset -> the resources that counted that
        replayed event already while others did not (``_skip_counted``)."""
        self._pname: str | None = None
        """The name the marks of the chunk being handled go by (None: no marks)."""
        self._ids: list[str] | None = None
        """The chunk's stream entry ids (its marks), or None (its offsets are)."""
        self._first = 0
        """The chunk's first offset."""
        self._by_name = {s.name: s for s in self.sources}

    # -- signals ----------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """First SIGINT/SIGTERM: warm stop (drain the cache). Second: cache and exit now."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop()

    def request_stop(self) -> None:
        """As a signal: the first stops the sources (warm stop), the second ends at once."""
        self.signals += 1
        for source in self.sources:
            source.stop()

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> RunStats:
        for source in self.sources:
            source.start(self.queue)
        open_sources = len(self.sources)
        ticks = _Ticks(time.monotonic())
        stop_by: float | None = None
        try:
            while open_sources and self.signals < 2:
                if self.signals and stop_by is None:
                    # Sources were told to stop: what they already queued is still
                    # handled (a stream's entries would otherwise stay pending), for
                    # as long as they take to say they ended, within a grace period
                    # (a stdin read can block until its next line).
                    stop_by = time.monotonic() + defaults.STOP_GRACE_S
                if stop_by is not None and time.monotonic() >= stop_by:
                    break
                open_sources -= self._next_chunk()
                self._tick(ticks, time.monotonic())
            self._drain()
            self._commit()
        finally:
            self.dead.close()
            self._publish()
        return self.stats

    def _next_chunk(self) -> int:
        """Handle the next chunk (waiting up to a batch's age for it), then the flush
        requests that came meanwhile; 1 if the chunk said its source ended, else 0."""
        try:
            chunk = self.queue.get(timeout=self.options.batch_max_age_s)
        except queue.Empty:
            chunk = None
        ended = 0
        if chunk is not None:
            if chunk.end:
                ended = 1
            else:
                self._handle(chunk)
        if self.control is not None:
            for request in self.control.poll():
                self._expire_requested(request)
        return ended

    def _tick(self, ticks: _Ticks, now: float) -> None:
        """What is due between chunks: purge and publish, send, commit, progress."""
        if now >= ticks.purge:
            if self.process.fenced:  # the heartbeat found out first
                self.batcher.send()
                self.batcher.wait()
                if self.process.fenced:
                    end_sessions([], acquire=self._start_over([])[1])
            self.cache.purge()
            self._publish()
            self._beat()
            ticks.purge = now + defaults.PURGE_INTERVAL_S
        if (
            self.batcher.in_flight is not None
            and now - self.batcher.sent_at >= self.batcher.max_age_s
        ):
            self.batcher.wait()  # its executes within a batch's age, events or not
        if self.batcher.due(now) or now >= ticks.commit:
            self.batcher.send()
            if now >= ticks.commit:
                self._commit()
                ticks.commit = now + defaults.COMMIT_INTERVAL_S
        if self.process.output_closed and self.signals < 2:
            log.info("the output's reader went away: stopping, keeping the rest in redis")
            self.request_stop()
            self.request_stop()  # as a second signal: deposit the rest, no execute
        if self._progress is not None and now >= ticks.progress:
            self._progress(self._progress_line())
            ticks.progress = now + defaults.PROGRESS_INTERVAL_S

    def _start_over(self, release: list[Update]) -> tuple[list[Update], list[Update]]:
        """After being fenced: a new id; of ``release`` (a refused batch's) and the
        cache, what to send again and what to acquire again.

        The old id's references and exec sets are the survivors' to recover. What
        is cached here was never deposited; from stdin or pub/sub nobody else has
        it, so it is kept. From a replayable source (``file:``, ``redis-stream:``)
        the source still has it, uncommitted, and a survivor may be counting it
        already: such updates are dropped, the sources read again from what is
        committed (or claim the old consumer's entries), and the marks make that
        replay count each event once.
        """
        old = self.process.reregister()
        dropped = self.cache.drop([k for k, u in self.cache.items() if u.highest])
        dropped += [u for u in release if u.highest]
        Watermarks.sent(dropped)
        for part in [p for p in self._read_to if _replayable(p[0])]:
            del self._read_to[part]
        self._highest.clear()
        log.error(
            "this worker was declared dead (silent past its TTL) as %s and fenced; "
            "it goes on as %s with the %d keys in its cache (%d keys of replayable "
            "sources dropped: their events are read again)",
            old,
            self.process.id,
            self.cache.size(),
            len(dropped),
        )
        return [u for u in release if not u.highest], self.cache.values()

    def _drain(self) -> None:
        """End every session: execute or cache. A second signal switches to cache-only."""
        keys = self.cache.keys()
        step = self.options.batch_max_keys
        for start in range(0, len(keys), step):
            if self.signals >= 2:
                break
            self.cache.expire_many(keys[start : start + step])
            self.batcher.send()
        if self.cache.size():
            self.batcher.mode = "cache"
            self.cache.expire_all()
        self.batcher.send()
        self.batcher.wait()

    def _expire_requested(self, request: FlushRequest) -> None:
        """Expire the cached keys a ``phonon flush`` names, send them, then say so."""
        keys = [k for k, u in self.cache.items() if request.matches(u.resource)]
        self.cache.expire_many(keys)
        self.batcher.send()
        self.batcher.wait()
        request.ack(len(keys))

    def _commit(self) -> None:
        """Commit, per partition, the offset below which every event is safe.

        An event is safe once the update it merged into has left the cache and
        its batch was sent (deposited in Redis or executed). Each update
        remembers the first offset per partition it holds (``marks``); the
        watermark is the smallest still cached, else how far we have read
        (``offsets.Watermarks``: O(what left since), not O(entries)). Called
        after the batch in flight is answered.
        """
        self.batcher.wait()
        for part, read_to in self._read_to.items():
            low = self.watermarks.low(part)
            source, partition = part
            source.commit(partition, read_to if low is None else low)

    def _handle(self, chunk: Chunk) -> None:
        """Route and merge one chunk of lines: the hot path, so locals over attributes.

        An event whose key is cached goes through the route's generated merger
        (codegen.py): merged in place, nothing built. The rest (a key's first
        event, several routes, a class whose ``merge`` needs an Update, a route
        with triggers) goes through ``Router.route`` and ``_insert``.
        """
        if chunk.owner is not None and chunk.owner != self.process.id:
            return  # read before this process was fenced: read again (``_start_over``)
        now_ms = self.process.clock()
        stats = self.stats
        tally = self.tallies[chunk.source]
        self._hits = tally.routed
        read, unmatched, dead = stats.events_read, stats.unmatched, stats.dead_lettered
        part = self._partition(chunk)
        stats.events_read += len(chunk.lines)
        if part is None and self._merge_lines is not None:
            self._handle_lines(chunk, now_ms)
        else:
            self._handle_each(chunk, part, now_ms)
        # Per source by the totals' change: once a chunk, nothing more per event.
        tally.read += stats.events_read - read
        tally.unmatched += stats.unmatched - unmatched
        tally.dead_lettered += stats.dead_lettered - dead

    def _handle_each(self, chunk: Chunk, part: tuple[Source, str] | None, now_ms: int) -> None:
        """``_handle``, one event at a time."""
        stats = self.stats
        loads = orjson.loads
        merge = self._merge
        mark = self.watermarks.mark
        pname = self._pname
        ids = chunk.ids
        offset = chunk.first_offset - 1
        routed_n = 0
        merged_n = 0  # events the one route's merger took (``_insert`` counts the rest)
        for line in chunk.lines:
            offset += 1
            try:
                event = loads(line)
            except orjson.JSONDecodeError as e:
                self._undecodable(chunk, offset, line, e)
                continue
            if type(event) is not dict:
                self._dead(chunk.source, line, f"not a JSON object: {type(event).__name__}")
                continue
            if merge is not None:
                try:
                    update = merge(event, now_ms)
                except EventError as e:
                    self._dead(chunk.source, line, str(e))
                    continue
                if update is None:
                    stats.unmatched += 1
                    continue
                if update is not False:
                    merged_n += 1
                    if part is not None:
                        marks = update.marks  # type: ignore[union-attr]
                        if marks is None or part not in marks:
                            mark(update, part, offset)  # type: ignore[arg-type]
                        if pname is not None:
                            high = offset if ids is None else ids[offset - chunk.first_offset]
                            _note_highest(update, pname, high)  # type: ignore[arg-type]
                    continue
            routed_n += self._route(event, chunk.source, line, part, offset, now_ms)
        stats.routed += routed_n + merged_n
        if merged_n:
            self._hits[0] += merged_n

    def _handle_lines(self, chunk: Chunk, now_ms: int) -> None:
        """``_handle`` for a chunk with no offsets to mark, through the route's lines
        merger: runs of events for cached keys merge with no Python call per
        event; each line it stops at (a new key, an error) goes the general way."""
        merge_lines = self._merge_lines
        assert merge_lines is not None
        lines = chunk.lines
        stats = self.stats
        n, end = 0, len(lines)
        while n < end:
            stop, skipped, event = merge_lines(lines, n, now_ms)
            stats.unmatched += skipped
            stats.routed += stop - n - skipped
            self._hits[0] += stop - n - skipped
            if event is not None:  # a key not cached: parsed already
                stats.routed += self._route(event, chunk.source, lines[stop], None, stop, now_ms)
            elif stop < end:
                reject = chunk.rejects.get(stop)
                one = Chunk(chunk.source, [lines[stop]], rejects={0: reject} if reject else {})
                self._handle_each(one, None, now_ms)
            n = stop + 1

    def _partition(self, chunk: Chunk) -> tuple[Source, str] | None:
        """Where the chunk's offsets are committed (None: nowhere); notes how far it is
        read, and blanks the events a replayed chunk had counted already."""
        if self._counted:
            self._counted = {}
        self._pname, self._ids, self._first = None, chunk.ids, chunk.first_offset
        if chunk.partition is None:
            return None
        part = (self._by_name[chunk.source], chunk.partition)
        if chunk.sequence is not None:  # a stream: marks per consumer, by entry id
            self._pname = f"{chunk.source}|{chunk.sequence}"
            if chunk.replay_of:  # claimed from a dead consumer
                self._skip_counted(chunk, [f"{chunk.source}|{c}" for c in chunk.replay_of])
        else:
            self._pname = _marked(part)
            if self._pname is not None and self._replaying(chunk, part, self._pname):
                self._skip_counted(chunk, [self._pname])
        self._read_to[part] = chunk.first_offset + len(chunk.lines)
        return part

    def _replaying(self, chunk: Chunk, part: tuple[Source, str], pname: str) -> bool:
        """Whether a ``file:`` chunk is below its partition's highest mark, as read
        when reading it (re)started: only those can hold events counted already."""
        if self._read_to.get(part) != chunk.first_offset:  # (re)starting to read it
            found = self.process.client.hget(self.process.keys.highest_marks, pname)
            self._highest[pname] = int(found) if found is not None else -1
        return chunk.first_offset <= self._highest.get(pname, -1)

    def _skip_counted(self, chunk: Chunk, pnames: list[str]) -> None:
        """Blank out the lines of a replayed chunk whose every key already counted them,
        and note, for a line only some of whose keys did, which keys to skip.

        A worker killed after depositing (or writing) an update leaves its
        events' offsets marked on the key (scripts.RELEASE_LUA's MARKS), while
        the committed offset stays behind them. Reading the partition again from
        there, an event at or below a key's mark was counted already on that
        key. An event of several keys (several routes) whose updates left the
        cache at different times may have been counted on some and not on the
        others when the worker died: it is counted again only on the others
        (``_counted``). Only chunks that can hold such events are checked (a
        file partition's below its highest mark, a stream's claimed from a dead
        consumer, against the marks of that consumer and of those its entries
        were claimed from before: ``pnames``): one round trip each, while
        replaying; none on the hot path.
        """
        client = self.process.client
        lines: list[tuple[int, list[str]]] = []
        for i, line in enumerate(chunk.lines):
            try:
                event = orjson.loads(line)
                routed = self.router.route(event) if type(event) is dict else ()
            except (orjson.JSONDecodeError, EventError):
                continue
            resources = [_resource(entry) for entry in routed]
            if resources:
                lines.append((i, resources))
        distinct = sorted({r for _, rs in lines for r in rs})
        pipe = client.pipeline(transaction=False)
        for resource in distinct:
            pipe.hmget(self.process.keys.resource(resource).seen, pnames)
        seen = {
            r: max(_order(v) for v in found if v is not None)
            for r, found in zip(distinct, pipe.execute())
            if any(v is not None for v in found)
        }
        skipped = 0
        none = (-1, 0)
        for i, resources in lines:
            at = _order(chunk.first_offset + i if chunk.ids is None else chunk.ids[i])
            counted = {r for r in resources if seen.get(r, none) >= at}
            if len(counted) == len(set(resources)):
                chunk.lines[i] = b""
                skipped += 1
            elif counted:
                self._counted[chunk.first_offset + i] = counted
        if skipped:
            log.info("%s: %d replayed events were counted already; skipped", pnames[0], skipped)

    def _route(
        self,
        event: dict[str, Any],
        source: str,
        line: bytes,
        part: tuple[Source, str] | None,
        offset: int,
        now_ms: int,
    ) -> int:
        """The general path for one event, through ``Router.route``; 1 if it was routed."""
        try:
            routed = self.router.route(event)
        except EventError as e:
            self._dead(source, line, str(e))
            return 0
        if not routed:
            self.stats.unmatched += 1
            return 0
        if self._counted and part is not None and offset in self._counted:
            counted = self._counted[offset]  # replayed: some keys counted it already
            routed = [e for e in routed if _resource(e) not in counted]
        for entry in routed:
            problem = self._insert(entry, event, part, offset, now_ms)
            if problem is not None:  # poison: dead-lettered, not routed
                self._dead(source, line, problem)
                return 0
        return 1

    def _undecodable(
        self, chunk: Chunk, offset: int, line: bytes, error: orjson.JSONDecodeError
    ) -> None:
        reject = chunk.rejects.get(offset - chunk.first_offset) if not line else None
        if reject is not None:
            self._dead(chunk.source, reject.raw, reject.reason, reject.truncated)
        elif not line.strip():
            self.stats.events_read -= 1  # blank lines are not events
        else:
            self._dead(chunk.source, line, f"invalid JSON: {error}")

    def _insert(
        self,
        entry: Routed,
        event: dict[str, Any],
        part: tuple[Source, str] | None,
        offset: int,
        now_ms: int,
    ) -> str | None:
        """Merge one routed event the general way: a new key builds its Update (and is
        queued for its reference); a cached one merges the event's doc. Returns why
        the event is poison (a spec no record can have, a sum out of range), or None."""
        route, id_, spec, doc = entry
        key: Hashable = id_ if self._single_route else (id(route), id_)
        merge_event, trigger, index = self._info[id(route)]
        cache = self.cache
        update = cache.peek(key)
        if update is None:
            problem = spec_problem(spec) if spec else None
            if problem is not None:
                return problem
            update = self._new_update(route, id_, spec, doc)
            update.route = self.route_names[index]
            cache.set(key, update)
            self.batcher.add_acquire(update)
        elif merge_event is None:
            cache.set(key, self._new_update(route, id_, spec, doc))
        else:
            try:
                merge_event(update, doc)
            except EventError as e:
                return str(e)
            update.events += 1
            update.touched_ms = now_ms
            cache.touch(key)
        if part is not None:
            self.watermarks.mark(update, part, offset)
            pname = self._pname
            if pname is not None:
                ids = self._ids
                _note_highest(update, pname, offset if ids is None else ids[offset - self._first])
        self._hits[index] += 1
        if trigger is not None and trigger(update, event):
            cache.expire(key)
        return None

    def _new_update(
        self, route: Route, id_: str, spec: dict[str, Any], doc: dict[str, Any]
    ) -> Update:
        opts = self.options
        soft, hard = route.soft_session_s, route.hard_session_s
        extra: dict[str, Any] = {}
        items = None
        if route.fields:  # the doc is the event's items: merged into an empty doc
            extra["fields"], items, doc = route.declared, doc, {}
        update = route.update(
            self.process,
            id_,
            database=route.database,
            collection=route.collection,
            spec=spec,
            doc=doc,
            acquire=False,
            soft_session=soft if soft is not None else opts.soft_session_s,
            hard_session=hard if hard is not None else opts.hard_session_s,
            **extra,
        )
        if items is not None:
            update.merge_event(items)  # type: ignore[misc]  # an instance method here (FieldsUpdate)
        return update

    def _dead(self, source: str, line: bytes, reason: str, truncated: bool = False) -> None:
        self.stats.dead_lettered += 1
        self.dead.write(source, line, reason, truncated)

    def _publish(self) -> None:
        s = self.process.stats
        self.stats.keys_executed = s.get("keys_executed", 0)
        self.stats.keys_cached = s.get("keys_cached", 0)
        self.stats.execute_failures = s.get("execute_failures", 0)
        self.stats.keys_quarantined = s.get("keys_quarantined", 0)
        self.stats.nulls_skipped = {name: skipped_nulls(fields) for name, fields in self._fields}
        elapsed = self.stats.elapsed_s
        s.update(
            {
                "entries": self.cache.size(),
                "events_read": self.stats.events_read,
                "events_per_s": round(self.stats.events_read / elapsed, 1) if elapsed else 0,
                "dead_lettered": self.stats.dead_lettered,
                "nulls_skipped": orjson.dumps(self.stats.nulls_skipped).decode()
                if self._fields
                else None,
                "pid": os.getpid(),
            }
        )
        if self._report is not None:
            self._report(self.stats.figures(self.cache.size()))

    def _beat(self) -> None:
        """Write the figures to Redis now, with a heartbeat, rather than at the next
        beat of the heartbeat thread (up to ``heartbeat_interval`` away), so that
        ``phonon status`` is about a second behind the loop, not ten."""
        try:
            self.process.heartbeat(self.process.client)
        except redis.RedisError as e:  # the heartbeat thread keeps trying; so will we
            log.debug("publishing figures failed: %s", e)

    def _progress_line(self) -> str:
        self._publish()
        return self.stats.progress(self.cache.size())


def _marked(part: tuple[Source, str]) -> str | None:
    """The name a partition's offset marks go by, for sources whose offsets mean the
    same to every worker (``file:``); None for the others."""
    source, partition = part
    return f"{source.name}|{partition}" if source.name.startswith("file:") else None


def _resource(entry: Routed) -> str:
    """The resource a routed event's update holds."""
    return resource_name(entry[0].collection, entry[1])


def _replayable(source: Source) -> bool:
    """Whether a source keeps what it handed out until committed (``file:``, streams)."""
    return source.name.startswith(("file:", "redis-stream:"))


def _order(mark: int | str) -> tuple[int, int]:
    """A mark (a file offset, a stream entry id ``MS-SEQ``, or either as Redis
    returns it) as a pair that orders as the marks do."""
    if isinstance(mark, int):
        return mark, 0
    ms, _, seq = mark.partition("-")
    return int(ms), int(seq or 0)


def _note_highest(update: Update, pname: str, offset: int | str) -> None:
    """``update`` now holds the event at ``offset`` of partition ``pname``."""
    high = update.highest
    if high is None:
        update.highest = {pname: offset}
    else:
        high[pname] = offset


def _triggers(route: Route) -> Callable[[Update, dict[str, Any]], bool] | None:
    """What ends a key's session at once, after merging an event: ``max_events``
    merged, or an event matching ``ends_when``. None when the route has neither."""
    max_events, ends_when = route.max_events, route.ends_when
    if not max_events and ends_when is None:
        return None

    def ended(update: Update, event: dict[str, Any]) -> bool:
        if max_events and update.events >= max_events:
            return True
        return ends_when is not None and ends_when(event)

    return ended


def progress_printer(stream: IO[str] = sys.stderr) -> Callable[[str], None]:
    def show(line: str) -> None:
        stream.write(f"\r\x1b[K{line}")
        stream.flush()

    return show
