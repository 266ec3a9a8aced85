"""One worker's identity in Redis: heartbeat, held references, recovery of the dead."""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import socket
import threading
import weakref
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

import redis

from .. import defaults
from ..clock import Clock, now_ms
from ..exceptions import AlreadyLocked, LockNotOwned, StoreReset
from ..store import liveness, scripts
from ..store.connection import StoreSettings, clone, public_url
from ..store.keys import Keys
from ..store.lock import Lock
from . import recovery
from .update import class_name

if TYPE_CHECKING:
    from .reference import Reference
    from .update import Update

log = logging.getLogger(__name__)


class Process:
    """A worker: its Redis connection, heartbeat, and the references it holds.

    Args:
        redis_url: the store; unset, ``PHONON_REDIS_URL``, then the embedded server.
        namespace: key prefix; unset, ``PHONON_NAMESPACE``, then ``phonon``.
        heartbeat_interval: seconds between heartbeats.
        process_ttl: seconds without a heartbeat after which this process counts
            as dead; default three heartbeat intervals.
        recover_failed_processes: recover what dead processes held, on every heartbeat.
        client: an existing connection to use instead of ``redis_url``.
        home: ``PHONON_HOME`` for the embedded server.
        clock: epoch-ms clock (tests inject one).
        start_heartbeat: start the heartbeat thread (tests may drive ``heartbeat()``).
        cluster: ``redis_url`` names a node of a Redis Cluster; unset,
            ``PHONON_REDIS_CLUSTER``.

    Raises:
        StoreUnavailable: the store cannot be reached.
    """

    AlreadyLocked = AlreadyLocked

    def __init__(
        self,
        redis_url: str | None = None,
        namespace: str | None = None,
        heartbeat_interval: float = defaults.HEARTBEAT_INTERVAL_S,
        process_ttl: float | None = None,
        recover_failed_processes: bool = True,
        *,
        client: redis.Redis | None = None,
        home: str | None = None,
        clock: Clock = now_ms,
        start_heartbeat: bool = True,
        cluster: bool | None = None,
    ) -> None:
        settings = StoreSettings.from_env(redis_url, namespace, home, cluster)
        self.settings = settings
        self.client: redis.Redis = client if client is not None else settings.connect()
        self._owns_client = client is None
        """Closed by ``stop()`` when made here; a client passed in is the caller's."""
        self.keys = Keys(settings.namespace)
        self.id = secrets.token_hex(8)
        self.clock = clock
        self.heartbeat_interval_s = float(heartbeat_interval)
        ttl_s = (
            process_ttl
            if process_ttl is not None
            else (self.heartbeat_interval_s * defaults.DEAD_AFTER_HEARTBEATS)
        )
        self.process_ttl_ms = max(1, int(ttl_s * 1000))
        self.recover_failed_processes = recover_failed_processes
        self.stats: dict[str, Any] = {}
        """Figures published with each heartbeat, for ``phonon status``."""
        self.known_classes: dict[str, type[Update]] = {}
        """Update classes this process may rebuild partials with: never import from data."""
        self.databases: dict[str, Any] = {}
        """Database URL as recipes name it (password hidden) -> the URL with it, from
        this process's own config: a recipe in Redis never holds a password."""
        self._locks: weakref.WeakSet[Lock] = weakref.WeakSet()
        self._exec_seq = 0
        self._batches = itertools.count(1)
        self.store_timeout_s = defaults.STORE_TIMEOUT_S
        """Seconds a batch keeps retrying an unreachable store before the run fails."""
        self._registered: set[type] = set()
        self._stop = threading.Event()
        """Ends the heartbeat thread: set last, once the references are released."""
        self._stop_recovery = threading.Event()
        self._stopped = False
        self._heartbeat_client = clone(self.client)
        self.started_ms = self.clock()
        self.identity: dict[str, Any] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_ms": self.started_ms,
            "heartbeat_interval_s": self.heartbeat_interval_s,
        }
        """Sent with every heartbeat: a process wrongly recovered as dead (paused past
        its TTL) whose hash was deleted comes back whole on its next beat."""
        self.store_id: str | None = None
        """The namespace's store id, as found at registration (see ``Keys.store_id``)."""
        self.fenced = False
        """Set once Redis refused a change because this process was declared dead
        (see ``scripts.FENCE_LUA``); ``reregister`` starts over under a new id."""
        self.output_closed = False
        self.last_heartbeat_ms = 0
        """When Redis last took this process's heartbeat (``healthy``, ``/healthz``)."""
        """A sink's reader went away (``OutputClosed``): the run stops and keeps the rest."""
        self.heartbeat(self.client, load_scripts=True, register=True)
        self._thread: threading.Thread | None = None
        self._recovery_thread: threading.Thread | None = None
        if start_heartbeat:
            self._thread = threading.Thread(
                target=self._heartbeat_loop, name=f"phonon-heartbeat-{self.id}", daemon=True
            )
            self._thread.start()
            if recover_failed_processes:
                self._recovery_thread = threading.Thread(
                    target=self._recovery_loop, name=f"phonon-recovery-{self.id}", daemon=True
                )
                self._recovery_thread.start()
        if recover_failed_processes:
            self.recover()

    # -- identity and liveness -------------------------------------------------

    def healthy(self) -> bool:
        """Alive as the others see it: not fenced, and a heartbeat taken within the TTL."""
        return not self.fenced and self.clock() - self.last_heartbeat_ms < self.process_ttl_ms

    def heartbeat(
        self,
        client: redis.Redis | None = None,
        extra: dict[str, Any] | None = None,
        load_scripts: bool = False,
        register: bool = False,
    ) -> bool:
        """Say we are alive: refresh the TTL'd alive key, the registry score and our figures.

        Returns False, and sets ``fenced``, if this process was declared dead
        (by a survivor, once its alive key had expired): it never comes back
        under this id.
        """
        now = self.clock()
        pid = self.id
        fields: dict[str, Any] = {"last_heartbeat_ms": now, **self.identity}
        fields.update(extra or {})
        fields.update({k: v for k, v in self.stats.items() if v is not None})
        args: list[Any] = [pid, now, self.process_ttl_ms, "1" if register else "0"]
        args.append(self.store_id or secrets.token_hex(8))
        for name, value in fields.items():
            args += [name, value if isinstance(value, (str, int, float)) else str(value)]
        keys = [self.keys.alive(pid), self.keys.process(pid), self.keys.processes]
        keys.append(self.keys.store_id)

        def build(pipe: Any) -> None:
            if load_scripts:
                scripts.load(pipe)
            scripts.queue(pipe, scripts.HEARTBEAT, keys, args)

        store_id = scripts.run(client or self._heartbeat_client, build, op="heartbeat")[-1]
        if store_id:
            if self.store_id is None:
                self.store_id = store_id
            self.last_heartbeat_ms = now
            return True
        if not self.fenced:
            log.error(
                "process %s was silent past its %.1f s TTL and was declared dead: "
                "Redis now refuses everything it asks under that id (fenced)",
                pid,
                self.process_ttl_ms / 1000,
            )
        self.fenced = True
        return False

    def reregister(self) -> str:
        """Start over under a new id after being fenced; returns the old id.

        Raises:
            StoreReset: it was not fenced but the store lost its state: going on
                would count only what is left, so the run must end.

        What the old id held is the survivors' now (they recover it as any dead
        process's). What this process holds only in memory was never in Redis,
        so it stays safe to deposit or execute under the new id, once its
        references are taken again.
        """
        found = self.client.get(self.keys.store_id)
        if found != self.store_id:
            raise StoreReset(
                f"the store at {self.settings.describe()} was reset: namespace "
                f"{self.keys.namespace!r} lost its state (a Redis restart without "
                "persistence, or FLUSHALL); what was deposited there is gone"
            )
        old = self.id
        self.id = secrets.token_hex(8)
        self._exec_seq = 0
        self.fenced = False
        self.heartbeat(self.client, register=True)
        # A flush --wait that counted on the old id follows it to the new one.
        self.client.set(self.keys.successor(old), self.id, px=defaults.SUCCESSOR_TTL_MS)
        log.warning("process %s starts over as %s", old, self.id)
        return old

    def _heartbeat_loop(self) -> None:
        # Only the heartbeat, nothing that can wait on a sink: recovery executes
        # partials into databases that may be locked for longer than the dead
        # timeout, and a survivor whose beat waited on that would itself be
        # declared dead while alive. A failing tick is logged and the loop goes
        # on: one Redis hiccup must not silently end the heartbeat.
        while not self._stop.wait(self.heartbeat_interval_s):
            try:
                self.heartbeat()
            except Exception:
                log.exception("heartbeat of process %s failed; retrying next interval", self.id)

    def _recovery_loop(self) -> None:
        # Its own thread, so a slow sink delays recovery, never the heartbeat.
        while not self._stop_recovery.wait(self.heartbeat_interval_s):
            try:
                self.recover()
            except Exception:
                log.exception("recovery by process %s failed; retrying next interval", self.id)

    def live_processes(self, ids: Iterable[str]) -> set[str]:
        return liveness.alive(self.client, self.keys, ids)

    # -- references and locks ----------------------------------------------------

    def create_reference(self, resource: str, block: bool = True) -> Reference:
        """Take a reference on ``resource`` (one round trip)."""
        from .reference import Reference

        ref = Reference(self, resource, block=block)
        ref.acquire()
        return ref

    def lock(
        self, key: str, block: bool = True, timeout_s: float = defaults.LOCK_TIMEOUT_S
    ) -> Lock:
        """A lock on ``key``, to use as a context manager; ``stop()`` releases it if still held."""
        return self.make_lock(self.keys.lock(key), block=block, timeout_s=timeout_s)

    def make_lock(
        self, redis_key: str, block: bool = True, timeout_s: float = defaults.LOCK_TIMEOUT_S
    ) -> Lock:
        lock = Lock(self.client, redis_key, block=block, timeout_s=timeout_s)
        self._locks.add(lock)
        return lock

    def register(self, cls: type[Update]) -> None:
        """Allow partials of ``cls`` to be rebuilt by this process (recovery, flush)."""
        if cls not in self._registered:  # every Update registers its class: keep it cheap
            self._registered.add(cls)
            self.known_classes.setdefault(class_name(cls), cls)

    def register_database(self, database: Any) -> None:
        """Allow partials whose recipe names ``database`` (by its URL without the
        password) to be written there by this process (recovery, flush)."""
        if isinstance(database, str):
            self.databases.setdefault(public_url(database), database)

    def batch_ids(self, calls: int) -> list[tuple[str, str]]:
        """(slot, batch id) for each script call of one pipeline: the same ids when
        the pipeline is sent again (see scripts.FENCE_LUA's lost replies). Slots are
        per thread, as the run loop and recovery send batches side by side."""
        batch = next(self._batches)
        thread = threading.get_ident()
        return [(f"{thread}:{i}", str(batch)) for i in range(calls)]

    def next_exec_seq(self) -> int:
        """A number that makes each execution's keys unique within this process."""
        self._exec_seq += 1
        return self._exec_seq

    def recover(self) -> int:
        """Clean up after every dead process (see ``recovery.recover``); how many."""
        return recovery.recover(self)

    # -- shutdown -----------------------------------------------------------------

    def stop(self) -> None:
        """Stop the heartbeat, release our locks, leave every reference, and unregister.

        References still held are released as a survivor would release a dead
        process's: partials left with no holder are executed here when their
        class is known, and otherwise stay in Redis for ``phonon flush``.
        Updates still in a local cache are not ended: expire them first.
        """
        if self._stopped:
            return
        self._stopped = True
        self._stop_recovery.set()
        if self._recovery_thread is not None:
            self._recovery_thread.join()
        if self.fenced:  # what it held is the survivors' to recover, not ours
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._close_clients()
            return
        for lock in list(self._locks):
            if lock.token is not None:
                try:
                    lock.release()
                except LockNotOwned:
                    pass
        try:
            # Still beating: executing what we leave orphaned may wait on a sink,
            # and others must not recover us meanwhile.
            orphans = recovery.release_resources_of(self, self.id, scan_executing=False)
            if orphans:
                recovery.claim_orphans(self, orphans)
        finally:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
        recovery.unregister(self, self.id)
        self._close_clients()

    def _close_clients(self) -> None:
        """Close our sockets now rather than leave them to the garbage collector (a
        cluster client's, in a reference cycle, would outlive the process object)."""
        self._heartbeat_client.close()
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def held_resources(self) -> set[str]:
        return cast("set[str]", self.client.smembers(self.keys.held(self.id)))

    def holders_by_resource(self, resources: Iterable[str]) -> dict[str, list[str]]:
        resources = list(resources)
        pipe = self.client.pipeline(transaction=False)
        for r in resources:
            pipe.hkeys(self.keys.resource(r).nodes)
        out: dict[str, list[str]] = defaultdict(list)
        for r, holders in zip(resources, pipe.execute()):
            out[r] = holders
        return out
