"""``redis-pubsub:CHANNEL``: a Redis pub/sub channel, or a pattern if it holds a glob.

Pub/sub is at-most-once by nature: Redis hands a message to whoever is
subscribed at that instant and keeps nothing, so a message published while no
worker is subscribed (not started yet, restarting, reconnecting, or cut off by
Redis for a full output buffer) is gone, and there is nothing to acknowledge or
replay. Use ``redis-stream:`` when loss matters.

Every subscriber receives every message, so two workers of one group
subscribed at once would count everything twice. Only one worker per group
subscribes, under a lock with a TTL; the others stand by and take over within
a few heartbeats if it dies.
"""

from __future__ import annotations

import logging
import queue
import time
from typing import TYPE_CHECKING, Any

import orjson
import redis

from ..exceptions import AlreadyLocked, LockNotOwned
from .base import Chunk, ThreadedSource, bytes_client, put_or_tick, split_payload

if TYPE_CHECKING:
    from ..core.process import Process

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 16
"""Bytes of messages gathered into one chunk before it goes to the run loop."""
CHUNK_LINES = 1000
"""Lines gathered into one chunk before it goes to the run loop."""
WAIT_S = 0.1
"""Seconds to wait for a message before doing upkeep (and noticing a stop)."""


class PubSubSource(ThreadedSource):
    """Subscribes on its own connection and forwards each message's lines.

    Args:
        name: the ``--source`` text, unique in the run.
        channel: a channel name, or a glob (``*``, ``?``, ``[``) for PSUBSCRIBE.
        process: this worker.
        group: the consumer group: one subscriber per group at a time.
    """

    def __init__(self, name: str, channel: str, process: Process, group: str) -> None:
        super().__init__()
        self.name = name
        self.channel = channel
        self.pattern = any(c in channel for c in "*?[")
        self.process = process
        keys = process.keys
        self._info_key = keys.source_info(group, name)
        self._lock = process.make_lock(keys.source_lock(group, name, "subscriber"), block=False)
        self._lock.ttl_ms = process.process_ttl_ms
        self._received = 0
        self._standby_logged = False

    def commit(self, partition: str, offset: int) -> None:
        """Pub/sub keeps nothing to acknowledge: chunks carry no partition."""

    def _run(self, out: queue.Queue[Chunk]) -> None:
        tick_s = min(1.0, self.process.heartbeat_interval_s)
        client = bytes_client(self.process)
        try:
            self._read(out, client, tick_s)
        except Exception:  # noqa: BLE001 - end the source, not the run
            log.exception("%s: reading failed; this source stops", self.name)
        client.close()
        try:
            self._lock.release()
        except LockNotOwned:
            pass
        except redis.RedisError:
            log.debug("%s: releasing the subscriber lock failed", self.name, exc_info=True)
        put_or_tick(out, Chunk(self.name, end=True), self._stop, tick_s, lambda: None)

    def _read(self, out: queue.Queue[Chunk], client: redis.Redis, tick_s: float) -> None:
        """Subscribe while we hold the group's subscriber lock; forward messages until stopped."""
        pubsub: Any = None
        next_tick = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + tick_s
                self._tick()
            if self._lock.token is None:  # standing by, or lost the lock
                if pubsub is not None:
                    pubsub.close()
                    pubsub = None
                self._stop.wait(tick_s)
                continue
            try:
                if pubsub is None:
                    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                    (pubsub.psubscribe if self.pattern else pubsub.subscribe)(self.channel)
                    log.info("%s: subscribed", self.name)
                chunk = self._gather(pubsub)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning(
                    "%s: connection lost (%s); messages published meanwhile are lost", self.name, e
                )
                pubsub = None
                self._stop.wait(tick_s)
                continue
            if chunk is not None:
                put_or_tick(out, chunk, self._stop, tick_s, self._tick)
        if pubsub is not None:
            pubsub.close()

    def _gather(self, pubsub: Any) -> Chunk | None:
        """Wait briefly for a message, then take whatever else is already there."""
        chunk = Chunk(self.name)
        size = 0
        message = pubsub.get_message(timeout=WAIT_S)
        while message is not None:
            if message["type"] in ("message", "pmessage"):
                data = message["data"]
                self._received += 1
                size += len(data)
                split_payload(data, chunk, self.max_line_bytes)
            if size >= CHUNK_BYTES or len(chunk.lines) >= CHUNK_LINES:
                break
            message = pubsub.get_message(timeout=0)
        return chunk if chunk.lines else None

    def _tick(self) -> None:
        """Take or keep the group's subscriber lock, and say so for ``phonon status``."""
        try:
            if self._lock.token is None:
                self._lock.acquire()
                self._standby_logged = False
            else:
                self._lock.extend()
            self.process.client.hset(
                self._info_key,
                self.channel,
                orjson.dumps(
                    {
                        "owner": self.process.id,
                        "received": self._received,
                        "updated_ms": self.process.clock(),
                    }
                ),
            )
        except AlreadyLocked:
            if not self._standby_logged:
                log.info("%s: another worker of the group is subscribed; standing by", self.name)
                self._standby_logged = True
        except LockNotOwned:
            self._lock.token = None  # expired (we stalled): someone else may subscribe now
            log.warning("%s: lost the subscriber lock; unsubscribing", self.name)
        except redis.RedisError as e:
            log.warning("%s: upkeep failed (%s); retrying", self.name, e)
