"""A local LRU of updates: merges on collision, ends sessions on eviction."""

from __future__ import annotations

import logging
from collections import OrderedDict
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

    def set(self, key: Hashable, update: Update) -> Update:
        """Merge ``update`` into the entry for ``key``, or insert it; returns the entry."""
        existing = self._entries.get(key)
        if existing is not None:
            existing.refresh(update)
            self._entries.move_to_end(key)
            return existing
        self._entries[key] = update
        if len(self._entries) > self.max_entries:
            self.expire_oldest()
        return update

    def get(self, key: Hashable) -> Update | None:
        update = self._entries.get(key)
        if update is not None:
            self._entries.move_to_end(key)
        return update

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

    def expire_many(self, keys: Sequence[Hashable]) -> None:
        updates = [u for u in (self._entries.pop(k, None) for k in keys) if u is not None]
        self._finish(updates)

    def purge(self, now_ms: int | None = None) -> int:
        """End the sessions that have passed their soft or hard limit; returns how many."""
        expired = [k for k, u in self._entries.items() if u.is_expired(now_ms)]
        self.expire_many(expired)
        return len(expired)

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
