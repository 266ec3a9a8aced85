"""An aggregate for one key, merged locally and written once per session by the last holder."""

from __future__ import annotations

import collections
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from .. import defaults, faults, telemetry
from ..exceptions import EventError, Fenced, OutputClosed, SerializationError
from ..poison import add_sums
from ..store.connection import is_cluster, public_url
from . import quarantine
from .reference import (
    Kind,
    Mode,
    Reference,
    Release,
    Taken,
    acquire_many,
    finish,
    put_back,
    release_many,
    send_release_many,
)

if TYPE_CHECKING:
    from prometheus_client import Counter

    from .process import Process

log = logging.getLogger(__name__)


def class_name(cls: type) -> str:
    """The ``module:Qualname`` that names an Update class in recipes and configs."""
    return f"{cls.__module__}:{cls.__qualname__}"


Failures = list[tuple["Update", BaseException]]


def resource_name(collection: str | None, id_: object) -> str:
    """The shared resource of a key: ``collection:id``, or the id alone. The one
    spelling: ``Update.resource`` and the run loop's replay check both use it."""
    return str(id_) if collection is None else f"{collection}:{id_}"


class Update:
    """Subclass it: override ``merge`` and ``execute`` (and ``state``/``clear`` if you
    keep attributes of your own). The framework decides when to cache and when to
    execute.

    Constructing one takes its reference in Redis (one round trip), unless
    ``acquire=False`` (the run loop takes references in batches instead).

    Args:
        process: the worker this update belongs to.
        _id: the key; with ``collection`` it names the shared resource.
        database, collection, spec, doc: as in the seed: where and what to write.
        init_cache: take the partials already cached in Redis into this update now.
        block: default for ``self.ref.lock()``.
        hard_session: seconds from the first event after which the session ends.
        soft_session: seconds of idleness (no merge) after which the session ends.
    """

    kind: ClassVar[Kind] = "json"
    """How partials are kept in Redis: "json" (a list of JSON partials the last
    holder merges with ``merge``) or "sums" (a hash summed inside Redis)."""
    forced: ClassVar[int] = 0
    """How many times any update was forced to expire: a cache's ``purge`` then
    looks at every entry (its fast path finds only what expired by time)."""
    merge_event: ClassVar[EventMerge | None] = None
    """How to merge one event's doc into a cached update of this class without
    building an Update (the run loop's path for every event after a key's first):
    ``cls.merge_event(update, doc)`` (a method ``merge_event(self, doc)`` is
    one). None: build an Update from the event and call ``merge``. A subclass
    that overrides ``merge`` gets None again, so that its own merge decides
    (``__init_subclass__``)."""
    route: str = ""
    """The config's name of the route that built it (``routes[0]``), the ``route`` label
    of its metrics; empty when it was rebuilt from Redis (recovery, ``flush``)."""
    execute_attempts: ClassVar[int] = defaults.EXECUTE_ATTEMPTS
    execute_backoff_s: ClassVar[float] = defaults.EXECUTE_BACKOFF_S
    _ref: Reference | None = None
    _block: bool = True
    cache_key: Hashable = None
    """The key an ``LruCache`` holds this update under (the cache sets it)."""

    def __init__(
        self,
        process: Process,
        _id: Any,
        database: Any = None,
        collection: str | None = None,
        spec: dict[str, Any] | None = None,
        doc: dict[str, Any] | None = None,
        init_cache: bool = False,
        block: bool = True,
        hard_session: float | None = defaults.HARD_SESSION_S,
        soft_session: float | None = defaults.SOFT_SESSION_S,
        *,
        acquire: bool = True,
    ) -> None:
        self.process = process
        self._id = _id
        self.database = database
        self.collection = collection
        self.spec: dict[str, Any] = dict(spec or {})
        self.doc: dict[str, Any] = dict(doc or {})
        self.hard_session_ms = None if hard_session is None else _ms(hard_session)
        self.soft_session_ms = None if soft_session is None else _ms(soft_session)
        now = process.clock()
        self.started_ms = now
        self.touched_ms = now
        self.events = 1
        """How many updates were merged into this one (itself included)."""
        self.marks: dict[Any, int] | None = None
        """Per source partition, the offset of the first event merged in: the run loop
        commits no offset beyond an event whose aggregate is still only in memory."""
        self.highest: dict[str, int | str] | None = None
        """Per replayable source partition (by name), the offset of the last event
        merged in (for a stream, per consumer, the entry id): recorded in Redis with
        the deposit or the write, so that a worker replaying the partition after a
        kill skips what this update counted."""
        self.error: BaseException | None = None
        """Why the last ``execute`` failed (the aggregate was then cached back in Redis)."""
        self.execution_id: str | None = None
        """Set while ``execute`` runs: the identity of the set of partials being
        written, when any were taken from Redis. The same set can be executed twice
        (a paused process and the survivor that recovered it; a crash between the
        database commit and the Redis cleanup), always under this id, so a sink
        that records it in the same transaction as the write, and skips ids it
        has recorded, writes each set once (the SQL sinks do: ``phonon_applied``).
        None when the aggregate was only ever in this process's memory: nobody
        else can write it."""
        self._force = False
        if not block:
            self._block = False
        process.register(type(self))
        if acquire:
            (absorbed,) = acquire_many(process, [self.resource], [init_cache])
            if absorbed is not None:
                self.absorb(*absorbed)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "merge" in cls.__dict__ and "merge_event" not in cls.__dict__:
            cls.merge_event = None

    # -- what subclasses override ---------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Attributes you set yourself (JSON-able), beyond ``doc``. None? Don't override."""
        return {}

    def clear(self) -> None:
        """Reset so that executing would change nothing (the spec still finds the record)."""
        self.doc = {}

    def merge(self, other: Update) -> None:
        """Combine ``other`` (always of the same type) into ``self``."""
        raise NotImplementedError(f"{class_name(type(self))} must define merge()")

    def execute(self) -> None:
        """Write the aggregate to the database. When is the framework's business."""
        raise NotImplementedError(f"{class_name(type(self))} must define execute()")

    @classmethod
    def execute_many(cls, updates: Sequence[Update]) -> Failures:
        """Execute several; return those that failed, with why.

        Sinks override this to write a whole batch in one transaction (and then
        fail or succeed together). The framework retries the failures and then
        caches them back in Redis, so a sink must never report success for a
        write it did not make."""
        failures: Failures = []
        for update in updates:
            try:
                update.execute()
            except Exception as e:  # noqa: BLE001 - any failure keeps the aggregate
                failures.append((update, e))
        return failures

    @classmethod
    def check_route(cls, route: Any) -> None:
        """Checked when the config loads (``phonon check``): what this class needs of
        a route it is named in. Sinks override.

        Raises:
            ConfigError: keyed relative to the route (``database``, ``spec``...).
        """

    @classmethod
    def check_connect(cls, route: Any) -> str | None:
        """``phonon check --connect``: reach where this class writes for ``route``,
        creating nothing; say what was found (None: nothing to open, e.g. a custom
        class that writes its own way). Sinks override.

        Raises:
            SinkError: it cannot be reached.
        """
        return None

    @classmethod
    def is_transient(cls, error: BaseException) -> bool:
        """True when a failed execute may succeed later (the database is down,
        locked or busy): the aggregate then stays in Redis. Otherwise, after its
        retries, it is quarantined (``core.quarantine``). Sinks may override."""
        return quarantine.is_transient(error)

    # -- what the framework provides ------------------------------------------------

    @property
    def resource(self) -> str:
        """The shared resource this update aggregates: ``collection:id``, or the id.
        Spelled when asked (twice per session), not kept: a string per cached key."""
        return resource_name(self.collection, self._id)

    @property
    def ref(self) -> Reference:
        """This process's claim on the resource, built when first asked: the run loop
        never asks (it takes and leaves references in batches), and an object per
        cached key was a fifth of its memory."""
        ref = self._ref
        if ref is None:
            ref = self._ref = Reference(self.process, self.resource, block=self._block)
            ref.force_expiry = self._force
        return ref

    def refresh(self, other: Update) -> None:
        """Merge a newer update for the same key; renews the soft session."""
        self.merge(other)
        self.events += other.events
        self.touched_ms = self.process.clock()

    def is_expired(self, now_ms: int | None = None) -> bool:
        if self._force:
            return True
        return (now_ms if now_ms is not None else self.process.clock()) >= self.expires_at_ms()

    def expires_at_ms(self) -> float:
        """When the soft or hard session ends, whichever is first (epoch ms)."""
        soft = (
            float("inf") if self.soft_session_ms is None else self.touched_ms + self.soft_session_ms
        )
        hard = (
            float("inf") if self.hard_session_ms is None else self.started_ms + self.hard_session_ms
        )
        return min(soft, hard)

    def end_session(self) -> bool:
        """Leave the resource: execute if last holder, else cache. True if executed."""
        return end_sessions([self])[0]

    def cache(self) -> None:
        """Deposit this partial in Redis and leave, even if last (the next holder, a
        survivor or ``phonon flush`` executes it)."""
        end_sessions([self], mode="cache")

    def set_force_expiry(self, flag: bool = True) -> None:
        """Expire at the next purge, and execute then even if others still hold the key."""
        self._force = flag
        if self._ref is not None:
            self._ref.force_expiry = flag
        if flag:
            Update.forced += 1

    def force_expiry(self) -> bool:
        self.set_force_expiry(True)
        return self.end_session()

    def recipe(self) -> str:
        """JSON naming the class and arguments that rebuild this update (no pickle).

        The database is named by its URL without the password: a recipe lives in
        Redis, readable by anyone who can read Redis. A process rebuilding it
        finds the real URL in its own config (``Process.databases``)."""
        database = self.database
        if isinstance(database, str):
            public = public_url(database)
            if public != database:  # a password: the recipe names the URL without it
                self.process.databases.setdefault(public, database)
                database = public
        return orjson.dumps(
            {
                "cls": class_name(type(self)),
                "id": self._id,
                "database": database,
                "collection": self.collection,
                "spec": self.spec,
            },
            option=orjson.OPT_NON_STR_KEYS,
        ).decode()

    def to_dict(self) -> dict[str, Any]:
        return {"doc": self.doc, "state": self.state()}

    def load(self, data: dict[str, Any]) -> None:
        """Take the state of a partial (from ``to_dict``) as this update's own."""
        self.doc = data.get("doc") or {}
        for name, value in (data.get("state") or {}).items():
            setattr(self, name, value)

    def payload(self) -> str:
        """This partial as deposited in Redis."""
        try:
            return orjson.dumps(self.to_dict()).decode()
        except TypeError as e:
            raise SerializationError(f"{self.resource}: state is not JSON: {e}") from e

    def blank(self) -> Update:
        """A fresh update for the same key, holding nothing, taking no reference."""
        other = type(self)(
            self.process,
            self._id,
            database=self.database,
            collection=self.collection,
            spec=self.spec,
            doc={},
            acquire=False,
        )
        other.clear()
        return other

    def absorb(self, kind: str, items: Sequence[str]) -> None:
        """Merge partials taken out of Redis into this update."""
        for item in items:
            other = self.blank()
            try:
                other.load(orjson.loads(item))
            except orjson.JSONDecodeError as e:
                raise SerializationError(f"{self.resource}: bad partial in redis: {e}") from e
            self.merge(other)


EventMerge = Callable[[Update, dict[str, Any]], None]


@functools.lru_cache(maxsize=64)
def _ms(seconds: float) -> int:
    """Seconds as ms: one int object per session length, not two per cached key."""
    return int(seconds * 1000)


def sum_into(update: Update, doc: dict[str, Any]) -> None:
    """Add a partial's numbers into ``update.doc``."""
    mine = update.doc
    for field, value in doc.items():
        mine[field] = mine.get(field, 0) + value


def sum_event(update: Update, doc: dict[str, Any]) -> None:
    """Add an event's numbers into ``update.doc``, unless a sum would leave the range a
    sink can hold.

    Raises:
        EventError: that sum (the doc is left as it was: the event is dead-lettered).
    """
    problem = add_sums(update.doc, doc)
    if problem is not None:
        raise EventError(problem)


class ConflictFreeUpdate(Update):
    """An update whose ``doc`` is numbers that add up: partials are summed inside
    Redis (HINCRBY/HINCRBYFLOAT), so caching needs no lock and no merge code, and
    one eviction is one round trip."""

    kind: ClassVar[Kind] = "sums"

    def merge(self, other: Update) -> None:
        sum_into(self, other.doc)

    merge_event = staticmethod(sum_event)  # type: ignore[assignment]  # mypy binds Callable ClassVars

    def payload(self) -> str:
        lines = []
        for field, value in self.doc.items():
            if not isinstance(field, str) or "\t" in field or "\n" in field:
                raise SerializationError(f"{self.resource}: field name {field!r} cannot be summed")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SerializationError(f"{self.resource}: {field}={value!r} is not a number")
            if value:
                lines.append(f"{field}\t{value!r}\n")
        return "".join(lines)

    def absorb(self, kind: str, items: Sequence[str]) -> None:
        if kind != "sums":
            return super().absorb(kind, items)
        doc = self.doc
        for field, raw in zip(items[::2], items[1::2]):
            try:
                value: int | float = int(raw)
            except ValueError:
                value = float(raw)
            doc[field] = doc.get(field, 0) + value


# -- batched session ends ------------------------------------------------------------


def acquire_updates(updates: Sequence[Update], init_cache: bool = False) -> None:
    """Take the references of updates built with ``acquire=False``: one round trip."""
    absorbed = (
        acquire_many(updates[0].process, [u.resource for u in updates], [init_cache] * len(updates))
        if updates
        else []
    )
    for update, got in zip(updates, absorbed):
        if got is not None:
            update.absorb(*got)


def end_sessions(
    updates: Sequence[Update], mode: Mode | None = None, acquire: Sequence[Update] = ()
) -> list[bool]:
    """End many sessions at once; True where this process executed.

    One script call (per ``BATCH_MAX_KEYS``) leaves every resource, each either
    depositing its partial or, as last holder, taking the others'. Then the
    taken ones are merged and executed, a batch per class, with retries; any
    that still fail are cached back in Redis (never dropped) with ``.error`` set.

    Args:
        mode: None to execute as last holder (or when forced), "cache" to deposit
            every partial regardless (fast shutdown).
        acquire: updates built with ``acquire=False`` whose references to take in
            the same round trip (all of one process).
    """
    to_acquire = [u.resource for u in acquire]
    if not updates:
        if acquire:
            release_many(acquire[0].process, [], to_acquire)
        return []
    by_process: dict[int, list[int]] = defaultdict(list)
    for i, u in enumerate(updates):
        by_process[id(u.process)].append(i)
    if acquire and id(acquire[0].process) not in by_process:
        release_many(acquire[0].process, [], to_acquire)
    executed = [False] * len(updates)
    for key, indexes in by_process.items():
        group = [updates[i] for i in indexes]
        mine = to_acquire if acquire and id(acquire[0].process) == key else []
        for i, done in zip(indexes, _end_sessions(group, mode, mine)):
            executed[i] = done
    return executed


def send_end_sessions(
    updates: Sequence[Update],
    mode: Mode | None = None,
    acquire: Sequence[Update] = (),
    alone: list[int] | None = None,
) -> Callable[[], list[Update]]:
    """``end_sessions`` in two steps, for updates (and acquires) of one process: the
    batch is written to Redis now; the function returned reads its reply, then
    executes what was taken. The run loop handles the next events in between,
    while Redis runs the batch. Call it before sending the next batch: one batch
    in flight at a time keeps each key's leaving and taking again in order.

    ``alone`` ([tried, not left], counts to add to; None: not at all): each
    update that can is first tried the sole holder's way (``RELEASE_ALONE``:
    not forced, no marks, not acquired again nor twice in the batch, not on a
    cluster). The function returns those that were not left that way (others
    hold them, or partials wait): end their sessions with ``end_sessions``.

    Raises (the function):
        Fenced: nothing of the batch was applied.
    """
    names = [u.resource for u in acquire]
    first = updates[0] if updates else acquire[0] if acquire else None
    if first is None:
        return lambda: []
    process = first.process
    rest: list[int] = list(range(len(updates)))
    trying: list[int] = []
    if alone is not None and mode is None and updates and not is_cluster(process.client):
        resources = [u.resource for u in updates]
        busy = set(names)
        if len(set(resources)) < len(resources):  # twice in the batch: the full way
            busy.update(r for r, n in collections.Counter(resources).items() if n > 1)
        rest, trying = [], []
        for i, u in enumerate(updates):
            fits = not u._force and u.highest is None and resources[i] not in busy
            (trying if fits else rest).append(i)
    full = [updates[i] for i in rest]
    releases, unfit = _releases(process, full, mode) if full else ([], 0)
    pending = send_release_many(process, releases, names, [updates[i].resource for i in trying])

    def reply() -> list[Update]:
        taken, left = pending()
        done = [updates[i] for i, ok in zip(trying, left) if ok]
        missed = [updates[i] for i, ok in zip(trying, left) if not ok]
        if alone is not None:
            alone[0] += len(trying)
            alone[1] += len(missed)
        got: list[Taken | None] = [*taken, *(Taken(u.kind, "", [], ("", "")) for u in done)]
        rels: list[Release | None] = [*releases, *([None] * len(done))]
        if full or done:
            _after_release(process, [*full, *done], rels, unfit, got)
        return missed

    return reply


def _end_sessions(
    updates: Sequence[Update], mode: Mode | None, acquire: Sequence[str]
) -> list[bool]:
    process = updates[0].process
    releases, unfit = _releases(process, updates, mode)
    return _after_release(
        process, updates, releases, unfit, release_many(process, releases, acquire)
    )


def _after_release(
    process: Process,
    updates: Sequence[Update],
    releases: Sequence[Release | None],
    unfit: int,
    taken: Sequence[Taken | None],
) -> list[bool]:
    """Merge what each release took, and execute (``_end_sessions``). A release of
    None left its resource alone (``send_end_sessions``): it took nothing."""
    ready = []
    for update, release, got in zip(updates, releases, taken):
        if got is None:
            continue
        try:
            update.absorb(got.kind, got.items)
        except Exception as e:  # noqa: BLE001 - a bad partial must not lose the others
            log.error("%s: cannot merge cached partials (%s); left in redis", update.resource, e)
            update.error = e
            assert release is not None  # one that left alone took nothing to merge
            back = [
                *put_back(update.resource, got),
                Release(update.resource, "cache", update.kind, release.recipe, release.payload),
            ]
            back[-1].exec_keys = got.exec_keys  # deposited and forgotten in one step
            if _cache_back(process, back):
                finish(process, [got])
            continue
        update.execution_id = got.execution_id
        ready.append((update, got))
    _count(process, "keys_cached", len(updates) - len(ready) - unfit)
    if len(ready) < len(updates):
        executing = {id(u) for u, _ in ready}
        _count_routes(telemetry.KEYS_CACHED, [u for u in updates if id(u) not in executing])
    done = execute_taken(process, ready)
    return [update in done for update in updates]


def _releases(
    process: Process, updates: Sequence[Update], mode: Mode | None
) -> tuple[list[Release], int]:
    """How each update leaves its resource, and how many were quarantined. One
    whose state cannot be deposited (a custom ``merge`` made a number past int64:
    ``payload`` refuses it) is quarantined first, whole, and then leaves without
    depositing or taking: the others' partials wait for the next holder. Without
    this the run ended with "state is not JSON", and every key of the batch still
    only in memory was lost."""
    releases, unfit = [], []
    for u in updates:
        rel = Release(
            u.resource,
            mode or ("force" if u._force else "end"),
            u.kind,
            u.recipe(),
            marks="".join(f"{p}\t{o}\n" for p, o in u.highest.items()) if u.highest else "",
        )
        try:
            rel.payload = u.payload()
        except SerializationError as e:
            u.error = e
            rel.mode = "cache"
            rel.exec_keys = process.keys.resource(u.resource).executing(
                process.id, process.next_exec_seq()
            )
            unfit.append(quarantine.poisoned(u, e, rel.exec_keys))
        releases.append(rel)
    quarantine.quarantine(process, unfit)
    return releases, len(unfit)


def execute_taken(process: Process, ready: Sequence[tuple[Update, Taken]]) -> set[Update]:
    """Execute merged aggregates, a batch per class: what fails for a passing reason
    (``is_transient``) is cached back in Redis, what never can be written is
    quarantined (``core.quarantine``). Returns the executed."""
    by_class: dict[type[Update], list[tuple[Update, Taken]]] = defaultdict(list)
    for update, got in ready:
        by_class[type(update)].append((update, got))
    executed: set[Update] = set()
    for cls, pairs in by_class.items():
        if any(got.execution_id for _, got in pairs):  # a set in Redis is being written
            faults.point("before-execute")
        failed = _execute_with_retries(cls, [u for u, _ in pairs])
        if any(got.execution_id for _, got in pairs):
            faults.point("after-execute")
        failed_ids = {id(u): e for u, e in failed}
        pairs, retried = _after_failures(process, cls, pairs, failed_ids)
        written = [u for u, _ in pairs if id(u) not in failed_ids]
        _count(process, "keys_executed", len(written))
        _count_routes(telemetry.KEYS_EXECUTED, written)
        _count(process, "execute_failures", retried)
        executed.update(written)
        finish(process, [got for _, got in pairs])
        for update, _ in pairs:
            update.execution_id = None
    return executed


def _after_failures(
    process: Process,
    cls: type[Update],
    pairs: list[tuple[Update, Taken]],
    failed: dict[int, BaseException],
) -> tuple[list[tuple[Update, Taken]], int]:
    """Cache back what failed for a passing reason, quarantine what never can be
    written. Returns the pairs whose taken sets to forget (all, unless this process
    was fenced meanwhile) and how many were cached back."""
    back, poisoned = [], []
    for update, got in pairs:
        error = failed.get(id(update))
        if error is None:
            continue
        update.error = error
        if isinstance(error, OutputClosed):  # said once, by the run loop, not per key
            process.output_closed = True
            rel = Release(update.resource, "cache", update.kind, update.recipe())
            rel.payload, rel.exec_keys = update.payload(), got.exec_keys
            back.append(rel)
        elif cls.is_transient(error):
            log.error(
                "%s: execute failed after %d attempts (%s); aggregate cached in redis",
                update.resource,
                cls.execute_attempts,
                error,
            )
            rel = Release(update.resource, "cache", update.kind, update.recipe())
            rel.payload, rel.exec_keys = update.payload(), got.exec_keys
            back.append(rel)
        else:  # retrying cannot help: set aside, with the set it was taken from
            poisoned.append(quarantine.poisoned(update, error, got.exec_keys))
    if (back or poisoned) and not _cache_back(process, back, poisoned):
        # Not cached back: their exec sets stay in Redis for the survivors.
        return [(u, got) for u, got in pairs if id(u) not in failed], 0
    return pairs, len(back)


def _cache_back(
    process: Process, releases: Sequence[Release], poisoned: Sequence[quarantine.Poisoned] = ()
) -> bool:
    """Deposit again what could not be written (and quarantine what never can be);
    False if this process was fenced meanwhile.

    What it had taken is then in Redis as an exec set that a survivor adopts and
    executes under the same execution id, so there is nothing to put back here.
    """
    try:
        if releases:
            release_many(process, releases)
        quarantine.quarantine(process, poisoned)
    except Fenced as e:
        process.fenced = True
        log.error(
            "process %s was declared dead while executing (%s); survivors take over", process.id, e
        )
        return False
    return True


def _execute_with_retries(cls: type[Update], updates: list[Update]) -> Failures:
    pause = cls.execute_backoff_s
    for attempt in range(1, cls.execute_attempts + 1):
        failures = quarantine.isolate(cls, updates)  # a poison key fails alone
        if failures:
            telemetry.SINK_WRITE_FAILURES.labels(telemetry.sink_name(cls)).inc(len(failures))
        if not failures or attempt == cls.execute_attempts:
            return failures
        if all(isinstance(e, OutputClosed) for _, e in failures):
            return failures  # nobody reads the output any more: waiting cannot help
        log.warning(
            "%s: %d executes failed (%s); %d attempts left",
            class_name(cls),
            len(failures),
            failures[0][1],
            cls.execute_attempts - attempt,
        )
        time.sleep(pause)
        pause *= 2
        updates = [u for u, _ in failures]
    return []


def _count(process: Process, name: str, n: int) -> None:
    if n:
        process.stats[name] = process.stats.get(name, 0) + n


def _count_routes(counter: Counter, updates: Sequence[Update]) -> None:
    """Add ``updates`` to ``counter`` by route: once per batch and route, not per key."""
    routes: dict[str, int] = {}
    for u in updates:
        routes[u.route] = routes.get(u.route, 0) + 1
    for route, n in routes.items():
        counter.labels(route).inc(n)
