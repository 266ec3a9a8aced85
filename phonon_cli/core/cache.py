"""A local LRU of updates: merges on collision, ends sessions on eviction."""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

from .. import defaults

if TYPE_CHECKING:
    from .update import Update

log = logging.getLogger(__name__)

Ender = Callable[[Sequence["Update"]], object]


def _end_now(updates: Sequence[Update]) -> object:
    from .update import end_sessions

    return end_sessions(updates)


class LruCache:
    """Holds at most ``max_entries`` updates, one per key.

    ``set`` merges into an existing entry (``refresh``) or inserts, ending the
    session of the least recently used entry when full. Entries leave the dict
    before their session ends, so ``size()`` always matches the contents; an
    entry whose ``end_session`` raises is kept in ``failed`` (the newest is
    ``get_last_failed()``), never silently dropped.

    Args:
        max_entries: capacity.
        end_sessions: called with the updates that leave, to end their sessions.
            The default ends them at once in one batched call; the run loop
            passes a batcher that sends them with the next batch.
    """

    def __init__(
        self, max_entries: int = defaults.MAX_ENTRIES, end_sessions: Ender | None = None
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, Update] = OrderedDict()
        self._end = end_sessions or _end_now
        self.failed: list[Update] = []
        # What lets ``purge`` look only at what expired (see there).
        self._by_age: dict[int, deque[Update]] = {}
        """Per hard-session length: updates in the order they entered (oldest first;
        entries that left since are skipped, and compacted away), each knowing its
        key (``Update.cache_key``: no tuple per entry)."""
        self._min_soft_ms: int | None = None
        """The shortest soft session of any entry (None: no entry has one)."""
        self._touch_ordered = True
        """The LRU order is the order of ``touched_ms`` (false once ``get`` reordered
        an entry without touching its session: then ``purge`` scans every entry)."""
        self._forced_seen = 0

    def set(self, key: Hashable, update: Update) -> Update:
        """Merge ``update`` into the entry for ``key``, or insert it; returns the entry."""
        existing = self._entries.get(key)
        if existing is not None:
            existing.refresh(update)
            self._entries.move_to_end(key)
            return existing
        self._entries[key] = update
        update.cache_key = key
        self._track(update)
        if len(self._entries) > self.max_entries:
            self.expire_oldest()
        return update

    def _track(self, update: Update) -> None:
        soft = update.soft_session_ms
        if soft is not None and (self._min_soft_ms is None or soft < self._min_soft_ms):
            self._min_soft_ms = soft
        hard = update.hard_session_ms
        if hard is not None:
            ages = self._by_age.get(hard)
            if ages is None:
                ages = self._by_age[hard] = deque()
            ages.append(update)
            if len(ages) > 2 * len(self._entries) + 1024:  # amortised O(1) per insert
                entries = self._entries
                self._by_age[hard] = deque(u for u in ages if entries.get(u.cache_key) is u)

    def peek(self, key: Hashable) -> Update | None:
        """The entry for ``key``, leaving the LRU order as it is."""
        return self._entries.get(key)

    def get(self, key: Hashable) -> Update | None:
        """The entry for ``key``, marked most recently used (its session is not renewed)."""
        update = self._entries.get(key)
        if update is not None:
            self._entries.move_to_end(key)
            self._touch_ordered = False
        return update

    def touch(self, key: Hashable) -> None:
        """Mark ``key`` most recently used, after its update's ``touched_ms`` was renewed."""
        self._entries.move_to_end(key)

    def hot_path(
        self,
    ) -> tuple[Callable[[Hashable], Update | None], Callable[[Hashable], None]]:
        """``(get, touch)``: look a key up without an LRU effect, and mark it the most
        recently used. The dict's own bound methods, so that a caller merging in
        place millions of times (the run loop) pays no Python frame for either;
        both are O(1) and allocate nothing."""
        return self._entries.get, self._entries.move_to_end

    def items(self) -> list[tuple[Hashable, Update]]:
        return list(self._entries.items())

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def values(self) -> list[Update]:
        return list(self._entries.values())

    def size(self) -> int:
        return len(self._entries)

    __len__ = size

    def expire(self, key: Hashable) -> bool:
        """End the session of ``key`` now. False if it is not cached."""
        update = self._entries.pop(key, None)
        if update is None:
            return False
        self._finish([update])
        return True

    def expire_oldest(self) -> None:
        if self._entries:
            _, update = self._entries.popitem(last=False)
            self._finish([update])

    def expire_all(self) -> None:
        """End every session, in batches."""
        self.expire_many(list(self._entries))

    def drop(self, keys: Sequence[Hashable]) -> list[Update]:
        """Remove these entries without ending their sessions; returns them. For
        updates whose events will be counted again from their source (a fenced
        worker's, see ``run.loop.Runner._start_over``): ending them would count twice."""
        return [u for u in (self._entries.pop(k, None) for k in keys) if u is not None]

    def expire_many(self, keys: Sequence[Hashable]) -> None:
        updates = [u for u in (self._entries.pop(k, None) for k in keys) if u is not None]
        self._finish(updates)

    def purge(self, now_ms: int | None = None) -> int:
        """End the sessions that have passed their soft or hard limit; returns how many.

        Costs what expired, not what is cached: the LRU order is the order of last
        touch, so idle sessions are found from the oldest end, stopping at the first
        entry touched within the shortest soft session; hard sessions are found
        from the oldest end of each hard length's entry order. Only after
        ``set_force_expiry`` or ``get`` (which break those orders' meaning) does
        it look at every entry.
        """
        from .update import Update

        entries = self._entries
        if not entries:
            return 0
        now = now_ms if now_ms is not None else next(iter(entries.values())).process.clock()
        if not self._touch_ordered or Update.forced != self._forced_seen:
            self._forced_seen = Update.forced
            expired = [k for k, u in entries.items() if u.is_expired(now)]
        else:
            expired = self._expired(now)
        self.expire_many(expired)
        return len(expired)

    def _expired(self, now: int) -> list[Hashable]:
        entries = self._entries
        expired: list[Hashable] = []
        if self._min_soft_ms is not None:
            idle_since = now - self._min_soft_ms
            for key, update in entries.items():
                if update.touched_ms > idle_since:
                    break
                if update.is_expired(now):
                    expired.append(key)
        found = set(expired)
        for hard, ages in self._by_age.items():
            born_before = now - hard
            while ages:
                update = ages[0]
                key = update.cache_key
                if entries.get(key) is not update:
                    ages.popleft()  # left the cache since
                elif update.started_ms <= born_before:
                    ages.popleft()
                    if key not in found:
                        expired.append(key)
                else:
                    break
        return expired

    def get_last_failed(self) -> Update | None:
        """The newest update whose session could not be ended (still in memory)."""
        return self.failed[-1] if self.failed else None

    def retry_failed(self) -> None:
        """Try again to end the sessions that failed (say, after Redis came back)."""
        failed, self.failed = self.failed, []
        self._finish(failed)

    def _finish(self, updates: list[Update]) -> None:
        if not updates:
            return
        try:
            self._end(updates)
        except Exception:
            # The updates are out of the dict but not safe in Redis: keep them.
            self.failed.extend(updates)
            raise
