"""What ``phonon status`` shows, read from Redis alone.

Everything comes from keys the workers keep up to date (their heartbeat hash,
the resources' nodelists and meta hashes, committed offsets), so status works
while workers run, after they died, and with none at all, and it never takes
part: it registers no process and writes nothing.

Scale: references are walked with ``SCAN`` (never ``KEYS``), one pipeline per
page, and never held all at once. The table keeps only totals and the
``limit`` oldest entries (bounded heaps); ``--json`` streams every reference
as it is read. A status is not a transaction: while workers run, a reference
may change between pages, and ``SCAN`` may report one twice while Redis
resizes its table, so totals are as good as a snapshot of moving data.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import orjson
import redis

from ..clock import Clock, now_ms
from ..core.recovery import RecoveryLock, recovery_lock
from ..store import liveness
from ..store.keys import Keys
from . import quarantine

SCAN_PAGE = 1000
"""Keys asked for per SCAN call; each page's details are read in one pipeline."""

EXIT_OK = 0

_INTS = "pid started_ms last_heartbeat_ms entries events_read dead_lettered".split()
_FLOATS = "heartbeat_interval_s events_per_s".split()
_COUNTERS = "keys_executed keys_cached execute_failures keys_quarantined".split()
"""Counted by the library (update.py) in every process: missing means none yet."""


@dataclass
class ReferenceInfo:
    """One resource's shared state."""

    resource: str
    holders: list[str]
    dead_holders: list[str]
    times_modified: int
    first_ms: int | None
    """The oldest holder's acquire time, or when the partial was cached: the entry's age."""
    cached_ms: int | None
    """When the partial now in Redis was first cached; None if there is none."""
    locked: bool = False
    kind: str | None = None
    update_class: str | None = None

    @property
    def cached(self) -> bool:
        return self.cached_ms is not None

    @property
    def orphaned(self) -> bool:
        """A partial waits in Redis and no live process will ever execute it on its own."""
        return self.cached and len(self.dead_holders) == len(self.holders)

    def to_json(self, now: int) -> dict[str, Any]:
        d = dict(self.__dict__, cached=self.cached, orphaned=self.orphaned)
        d["age_s"] = _age_s(now, d.pop("first_ms"))
        d["cached_age_s"] = _age_s(now, d.pop("cached_ms"))
        d["class"] = d.pop("update_class")
        return d

    def row(self, now: int) -> list[str]:
        live = len(self.holders) - len(self.dead_holders)
        row = [self.resource, _age(_age_s(now, self.first_ms)), str(live)]
        row += [str(len(self.dead_holders)), _num(self.times_modified)]
        row += [_age(_age_s(now, self.cached_ms)), "yes" if self.locked else "-"]
        return row + ["yes" if self.orphaned else "-"]

    def orphan_row(self, now: int) -> list[str]:
        age = _age(_age_s(now, self.cached_ms))
        return [self.resource, age, str(len(self.dead_holders)), self.update_class or "?"]


@dataclass
class Totals:
    processes: int = 0
    alive: int = 0
    dead: int = 0
    entries: int = 0
    events_per_s: float = 0.0
    references: int = 0
    held: int = 0
    cached: int = 0
    orphaned: int = 0
    locked: int = 0
    partitions: int = 0
    nulls_skipped: dict[str, int] = field(default_factory=dict)
    """Per fields route, the nulls skipped by every listed process (SQL's rule)."""
    quarantined: int = 0
    """Resources with aggregates set aside because they can never be written."""
    stranded: int = 0
    """Sets dead processes took to execute, of a class no survivor knew yet: kept
    whole, with their execution ids, for a worker or ``flush -c`` that knows it."""

    def count(self, ref: ReferenceInfo) -> None:
        self.references += 1
        self.held += len(ref.holders) > len(ref.dead_holders)
        self.cached += ref.cached
        self.orphaned += ref.orphaned
        self.locked += ref.locked


class Oldest:
    """The ``limit`` oldest references seen, in memory bounded by ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.heap: list[tuple[float, int, ReferenceInfo]] = []  # (-ms, -seen): youngest on top
        self.seen = 0

    def add(self, ms: int | None, ref: ReferenceInfo) -> None:
        self.seen += 1
        item = (-(ms if ms is not None else float("inf")), -self.seen, ref)
        if len(self.heap) < self.limit:
            heapq.heappush(self.heap, item)
        elif self.limit and item[0] > self.heap[0][0]:
            heapq.heapreplace(self.heap, item)

    def sorted(self) -> list[ReferenceInfo]:
        return [ref for *_, ref in sorted(self.heap, key=lambda x: (-x[0], -x[1]))]


@dataclass
class Snapshot:
    """What the table shows: every figure counted, only the oldest entries kept."""

    store: str
    namespace: str
    now_ms: int
    processes: list[dict[str, Any]]
    sources: list[dict[str, Any]]
    limit: int = 20
    """Rows per section of the table."""
    oldest: list[ReferenceInfo] = field(default_factory=list)
    orphans: list[ReferenceInfo] = field(default_factory=list)
    totals: Totals = field(default_factory=Totals)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    """The ``limit`` most recently quarantined resources (``Quarantined.summary``)."""
    recovery: RecoveryLock | None = None
    """Who holds the recovery lock, when somebody does."""


class Status:
    """Reads the state of one namespace.

    Args:
        client: a connection to the store.
        namespace: whose keys to read.
        store: how to name the store in the output (never with a password).
        clock: epoch-ms clock, for ages.
    """

    def __init__(self, client: redis.Redis, namespace: str, store: str, clock: Clock = now_ms):
        self.client = client
        self.keys = Keys(namespace)
        self.store = store
        self.clock = clock

    def processes(self) -> list[dict[str, Any]]:
        """Every registered process, alive first, then by start time (JSON-ready).

        Fields: id, alive, host, pid, started_ms, last_heartbeat_ms, heartbeat_age_s,
        heartbeat_interval_s, entries, events_read, events_per_s, keys_executed,
        keys_cached, execute_failures, keys_quarantined, dead_lettered, held (references
        it holds) and flushable (takes ``phonon flush`` requests: a ``phonon run``
        worker). Figures a library ``Process`` does not publish are None.
        """
        now = self.clock()
        ids = [str(pid) for pid in self.client.zrange(self.keys.processes, 0, -1)]
        pipe = self.client.pipeline(transaction=False)
        for pid in ids:
            pipe.hgetall(self.keys.process(pid))
            pipe.exists(self.keys.alive(pid))
            pipe.scard(self.keys.held(pid))
        replies = pipe.execute() if ids else []
        out = []
        for i, pid in enumerate(ids):
            h, alive, held = replies[3 * i : 3 * i + 3]
            p: dict[str, Any] = {"id": pid, "alive": bool(alive), "host": h.get("host")}
            p.update((k, _int(h.get(k))) for k in _INTS)
            p["heartbeat_age_s"] = _age_s(now, p["last_heartbeat_ms"])
            p.update((k, _float(h.get(k))) for k in _FLOATS)
            p.update((k, _int(h.get(k)) or 0) for k in _COUNTERS)
            p.update(held=int(held), flushable=h.get("flushable") == "1")
            p["nulls_skipped"] = _nulls(h.get("nulls_skipped"))
            out.append(p)
        out.sort(key=lambda p: (not p["alive"], p["started_ms"] or 0, p["id"]))
        return out

    def references(
        self, live: Iterable[str] = (), match: Callable[[str], bool] | None = None
    ) -> Iterator[ReferenceInfo]:
        """Every resource with shared state, a SCAN page at a time.

        A resource has a ``nodes`` hash while anyone holds it and a ``meta``
        hash while a partial is cached (with ``cached_ms``, removed whenever
        the partial is taken), so one SCAN over the resources' keys finds
        both: a resource is reported from its ``nodes`` key, or from its
        ``meta`` key when nobody holds it (an orphan). Two reads per resource,
        one pipeline per page; locks, which are rare, come from a SCAN of
        their own rather than a third read for every resource.

        Args:
            live: process ids known to be alive; other holders are checked once each.
            match: only resources for which this is true (filtered before reading them).
        """
        alive: dict[str, bool] = dict.fromkeys(live, True)
        locked = set(self._scan_resources("lock", match, count=10 * SCAN_PAGE))
        page: list[tuple[str, bool]] = []
        for key in self.client.scan_iter(match=self.keys.resource_pattern("*"), count=SCAN_PAGE):
            held = key.endswith(":nodes")
            if not held and not key.endswith(":meta"):
                continue  # partials, locks, executions: read with their resource
            resource = self.keys.resource_of(key)
            if resource is not None and (match is None or match(resource)):
                page.append((resource, held))
            if len(page) >= SCAN_PAGE:
                yield from self._read_page(page, alive, locked)
                page = []
        if page:
            yield from self._read_page(page, alive, locked)

    def _scan_resources(
        self, kind: str, match: Callable[[str], bool] | None, count: int
    ) -> Iterator[str]:
        for key in self.client.scan_iter(match=self.keys.resource_pattern(kind), count=count):
            resource = self.keys.resource_of(key)
            if resource is not None and (match is None or match(resource)):
                yield resource

    def _read_page(
        self, page: list[tuple[str, bool]], alive: dict[str, bool], locked: set[str]
    ) -> list[ReferenceInfo]:
        pipe = self.client.pipeline(transaction=False)
        for r, _ in page:
            rk = self.keys.resource(r)
            pipe.hgetall(rk.nodes)
            pipe.hmget(rk.meta, "times_modified", "cached_ms", "kind", "recipe")
        replies = pipe.execute()
        unknown = list({h for nodes in replies[0::2] for h in nodes if h not in alive})
        if unknown:  # a process that registered after we read the process list
            up = liveness.alive(self.client, self.keys, unknown)
            alive.update((pid, pid in up) for pid in unknown)
        out = []
        for i, (resource, from_nodes) in enumerate(page):
            nodes, (modified, cached_ms, kind, recipe) = replies[2 * i], replies[2 * i + 1]
            cached_at = _int(cached_ms)
            if not nodes and cached_at is None:
                continue  # ended between the SCAN and this read
            if nodes and not from_nodes:
                continue  # held: reported when the SCAN meets its nodes key
            since = [t for t in map(_int, [*nodes.values(), cached_at]) if t is not None]
            dead = sorted(h for h in nodes if not alive.get(h))
            ref = ReferenceInfo(resource, sorted(nodes), dead, _int(modified) or 0, None, None)
            ref.first_ms, ref.cached_ms = min(since, default=None), cached_at
            ref.locked = resource in locked
            if cached_at is not None:
                ref.kind, ref.update_class = kind, _recipe_class(recipe)
            out.append(ref)
        return out

    def sources(self, only: Sequence[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
        """Committed offsets of every consumer group and source, per partition.

        Fields: group, source, partition, committed, lag and owner (the reading
        process, if known). Lag is what the readers last published (``source_info``):
        a file partition's end minus its committed offset, a stream group's lag; None
        when no reader has said.

        Args:
            only: these ``(group, source)`` pairs, read without a SCAN of the
                namespace (a run's ``--metrics``); None: every one there is.
        """
        found = []
        if only is not None:
            found = list(only)
        else:
            for key in self.client.scan_iter(match=self.keys.offsets_pattern(), count=SCAN_PAGE):
                parsed = self.keys.offsets_of(key)
                if parsed is not None:
                    found.append(parsed)
        found.sort()
        pipe = self.client.pipeline(transaction=False)
        for group, source in found:
            pipe.hgetall(self.keys.offsets(group, source))
            pipe.hgetall(self.keys.members(group, source))
            pipe.hgetall(self.keys.source_info(group, source))
        replies = pipe.execute() if found else []
        out = []
        for i, (group, source) in enumerate(found):
            offsets, members, infos = replies[3 * i : 3 * i + 3]
            for part in sorted(offsets, key=_natural):
                committed = _int(offsets[part])
                row = {"group": group, "source": source, "partition": part}
                lag = _lag(committed, infos.get(part))
                row.update(committed=committed, lag=lag, owner=members.get(part))
                out.append(row)
        return out

    def snapshot(self, limit: int) -> Snapshot:
        """Totals, every process, and the ``limit`` oldest references and orphans."""
        processes = self.processes()
        snap = Snapshot(self.store, self.keys.namespace, self.clock(), processes, self.sources())
        snap.limit = limit
        _count_processes(snap.totals, processes, snap.sources)
        oldest, orphans = Oldest(limit), Oldest(limit)
        for ref in self.references(p["id"] for p in processes if p["alive"]):
            snap.totals.count(ref)
            oldest.add(ref.first_ms, ref)
            if ref.orphaned:
                orphans.add(ref.cached_ms, ref)
        snap.oldest, snap.orphans = oldest.sorted(), orphans.sorted()
        snap.quarantined = self.quarantined(snap.totals, limit)
        snap.recovery = recovery_lock(self.client, self.keys)
        snap.totals.stranded = self.stranded()
        return snap

    def stranded(self) -> int:
        return int(self.client.scard(self.keys.stranded))

    def quarantined(self, totals: Totals, limit: int | None) -> list[dict[str, Any]]:
        """The most recently quarantined resources (all when ``limit`` is None),
        newest first; every one is counted in ``totals``."""
        now = self.clock()
        found = [q.summary(now) for q in quarantine.scan(self.client, self.keys)]
        totals.quarantined = len(found)
        found.sort(key=lambda q: -(q["at_ms"] or 0))
        return found if limit is None else found[:limit]

    def write_json(self, out: IO[str], limit: int | None = None) -> int:
        """Write one JSON object, streaming the references; returns the exit code.

        Without ``limit`` every reference is written as it is read (in SCAN
        order), so memory stays flat however many there are; with it, the
        ``limit`` oldest, oldest first. ``totals`` comes last because it is
        counted on the way.
        """
        processes, sources, now, totals = self.processes(), self.sources(), self.clock(), Totals()
        _count_processes(totals, processes, sources)
        head = {"store": self.store, "namespace": self.keys.namespace, "now_ms": now}
        head["processes"] = processes
        out.write(_dumps(head)[:-1] + ',"references":[')
        refs = self.references(p["id"] for p in processes if p["alive"])
        if limit is not None:
            kept = Oldest(limit)
            for ref in refs:
                totals.count(ref)
                kept.add(ref.first_ms, ref)
            refs = iter(kept.sorted())
        for n, ref in enumerate(refs):
            if limit is None:
                totals.count(ref)
            out.write(("," if n else "") + _dumps(ref.to_json(now)))
        lock = recovery_lock(self.client, self.keys)
        totals.stranded = self.stranded()
        tail = {
            "sources": sources,
            "quarantined": self.quarantined(totals, limit),
            "recovery_lock": None if lock is None else lock.to_json(),
            "totals": asdict(totals),
        }
        out.write("]," + _dumps(tail)[1:] + "\n")
        return EXIT_OK


# -- the table -------------------------------------------------------------------------

WIDTH = 100
"""Columns the table fits in."""

# Every column is documented in docs/status.md (a test checks it). "NAME>" is aligned
# right, "NAME<N" is cut to N characters, and "NAME*" gives way when a line is too long.
PROCESS_COLUMNS = "ID HOST*<24 PID> STATE UP> BEAT> ENTRIES> EVENTS> EV/S> EXEC> CACHED>"
REFERENCE_COLUMNS = "RESOURCE* AGE> HOLDERS> DEAD> MODIFIED> PARTIAL> LOCK ORPHAN"
ORPHAN_COLUMNS = "RESOURCE* PARTIAL> DEAD> CLASS<40"
QUARANTINE_COLUMNS = "RESOURCE<40 RECORDS> SINCE> ERROR*"
SOURCE_COLUMNS = "GROUP<16 SOURCE* PARTITION<16 COMMITTED> LAG> OWNER"


def _lag(committed: int | None, info: str | None) -> int | None:
    """Events behind, from what a partition's reader published (None if unknown)."""
    if info is None:
        return None
    try:
        published = orjson.loads(info)
    except orjson.JSONDecodeError:
        return None
    end = published.get("end")
    if isinstance(end, int) and committed is not None:
        return max(0, end - committed)
    lag = published.get("lag")
    return lag if isinstance(lag, int) else None


_SOURCE_FIELDS = "group source partition committed lag owner".split()
_COLUMN = re.compile(r"(?P<header>[^*<>]+)(?P<flex>\*)?(?P<right>>)?(?:<(?P<max>\d+))?")


def headers(columns: str) -> list[str]:
    return [c.group("header") for c in map(_COLUMN.fullmatch, columns.split()) if c]


def render(snap: Snapshot, width: int = WIDTH) -> str:
    """The human-readable status, every line at most ``width`` columns (docs/status.md)."""
    t, now, limit = snap.totals, snap.now_ms, snap.limit
    store, _, data = snap.store.partition(" (")  # the embedded server's data dir: own line
    lines = [_cut(f"store: {store}", width)] + ([_cut(f"       ({data}", width)] if data else [])
    lines.append(_cut(f"namespace: {snap.namespace}", width))
    lines.append(
        f"processes: {t.processes:,} ({t.alive:,} alive, {t.dead:,} dead), "
        f"{t.entries:,} entries cached, {_rate(t.events_per_s)} events/s"
    )
    lines.append(
        f"references: {t.references:,} ({t.held:,} held, {t.cached:,} with a cached "
        f"partial, {t.orphaned:,} orphaned, {t.locked:,} locked)"
    )
    if any(t.nulls_skipped.values()):
        skipped = ", ".join(f"{r} {_num(n)}" for r, n in sorted(t.nulls_skipped.items()) if n)
        lines.append(_cut(f"nulls skipped: {skipped}", width))
    if t.quarantined:
        lines.append(
            f"quarantined: {t.quarantined:,} resource(s) that can never be written as they are"
        )
    if snap.recovery is not None:
        lines.append(_cut(f"recovery: {snap.recovery.describe()}", width))
    if t.stranded:
        lines.append(
            f"stranded: {t.stranded:,} set(s) dead processes were writing, of a class no "
            "survivor knew: run a worker or flush -c with it"
        )
    rows = [_process_row(p, now) for p in snap.processes[:limit]]
    lines += ["", _heading("PROCESSES", len(rows), t.processes)]
    lines += _table(PROCESS_COLUMNS, rows, t.processes, width)
    rows = [r.row(now) for r in snap.oldest]
    lines += ["", _heading("REFERENCES", len(rows), t.references, "oldest ")]
    lines += _table(REFERENCE_COLUMNS, rows, t.references, width)
    if t.orphaned:
        rows = [r.orphan_row(now) for r in snap.orphans]
        lines += ["", _heading("ORPHANED PARTIALS", len(rows), t.orphaned, "oldest ")]
        lines[-1] = lines[-1][:-1] + "; execute them with: phonon flush -c CONFIG --all)"
        lines += _table(ORPHAN_COLUMNS, rows, t.orphaned, width)
    if t.quarantined:
        rows = [_quarantine_row(q) for q in snap.quarantined]
        lines += ["", _heading("QUARANTINED", len(rows), t.quarantined, "newest ")]
        lines[-1] = lines[-1][:-1] + "; see: phonon quarantine list)"
        lines += _table(QUARANTINE_COLUMNS, rows, t.quarantined, width)
    rows = [[_opt(s[k]) for k in _SOURCE_FIELDS] for s in snap.sources[:limit]]
    lines += ["", _heading("SOURCE PARTITIONS", len(rows), t.partitions)]
    lines += _table(SOURCE_COLUMNS, rows, t.partitions, width)
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _quarantine_row(q: dict[str, Any]) -> list[str]:
    return [q["resource"], _num(q["records"]), _age(q["age_s"]), q["error"] or "-"]


def _process_row(p: dict[str, Any], now: int) -> list[str]:
    row = [p["id"], p["host"] or "?", _opt(p["pid"]), "alive" if p["alive"] else "dead"]
    row += [_age(_age_s(now, p["started_ms"])), _age(p["heartbeat_age_s"])]
    row += [_num(p["entries"]), _num(p["events_read"]), _rate(p["events_per_s"])]
    return row + [_num(p["keys_executed"]), _num(p["keys_cached"])]


def _heading(name: str, shown: int, total: int, which: str = "") -> str:
    """``NAME (12)``, or ``NAME (3 oldest of 12)`` when ``--limit`` leaves some out."""
    return f"{name} ({total:,})" if shown == total else f"{name} ({shown:,} {which}of {total:,})"


def _table(columns: str, rows: list[list[str]], total: int, width: int) -> list[str]:
    """Aligned columns two spaces apart; the flexible one gives way to fit ``width``.
    ``total``: how many rows there are in all, to say how many were left out."""
    if not rows:
        return ["(none)"] if not total else [f"({total:,} not shown: raise --limit)"]
    specs = [c for c in map(_COLUMN.fullmatch, columns.split()) if c]
    heads = [c.group("header") for c in specs]
    widths = []
    for i, c in enumerate(specs):
        w = max(len(heads[i]), *(len(row[i]) for row in rows))
        widths.append(min(w, int(c.group("max"))) if c.group("max") else w)
    over = sum(widths) + 2 * (len(specs) - 1) - width
    flex = next(i for i, c in enumerate(specs) if c.group("flex"))
    if over > 0:
        widths[flex] = max(len(heads[flex]), widths[flex] - over)
    out = []
    for row in [heads, *rows]:
        cells = [_cut(cell, w) for cell, w in zip(row, widths, strict=True)]
        cells = [
            cell.rjust(w) if c.group("right") else cell.ljust(w)
            for c, w, cell in zip(specs, widths, cells, strict=True)
        ]
        out.append(_cut("  ".join(cells), width))
    if total > len(rows):
        out.append(f"... {total - len(rows):,} more (--json lists them all)")
    return out


def _cut(text: str, w: int) -> str:
    """Shorten from the middle, where names differ least (prefixes and ids both matter)."""
    if len(text) <= w:
        return text
    keep = max(w - 1, 0)
    return text[: (keep + 1) // 2] + "…" + text[len(text) - keep // 2 :] if w > 1 else text[:w]


def _num(n: int | None) -> str:
    """At most 7 characters: 999,999 then 1.2M, 3.4G."""
    if n is None:
        return "-"
    return f"{n:,}" if abs(n) < 1e6 else f"{n / 1e6:.1f}M" if abs(n) < 1e9 else f"{n / 1e9:.1f}G"


def _rate(r: float | None) -> str:
    return "-" if r is None else f"{r:.1f}" if r < 10 else _num(round(r))


def _age(s: float | None) -> str:
    """Compact durations: 0.4s, 45s, 12m05s, 3h02m, 2d04h."""
    if s is None:
        return "-"
    n = int(s)
    if s < 60:
        return f"{max(s, 0):.1f}s" if s < 10 else f"{n}s"
    if n < 3600:
        return f"{n // 60}m{n % 60:02d}s"
    if n < 86400:
        return f"{n // 3600}h{n % 3600 // 60:02d}m"
    return f"{n // 86400}d{n % 86400 // 3600:02d}h"


def _opt(value: Any) -> str:
    return "-" if value is None else str(value)


def _count_processes(t: Totals, processes: list[dict[str, Any]], sources: list[Any]) -> None:
    t.processes, t.partitions = len(processes), len(sources)
    live = [p for p in processes if p["alive"]]
    t.alive, t.dead = len(live), len(processes) - len(live)
    t.entries = sum(p["entries"] or 0 for p in live)
    t.events_per_s = round(sum(p["events_per_s"] or 0 for p in live), 1)
    for p in processes:
        for route, n in p.get("nulls_skipped", {}).items():
            t.nulls_skipped[route] = t.nulls_skipped.get(route, 0) + n


def _recipe_class(recipe: str | None) -> str | None:
    """The Update class named by a partial's recipe (read as data, never imported)."""
    try:
        cls = orjson.loads(recipe or "{}").get("cls")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return cls if isinstance(cls, str) else None


def _natural(partition: str) -> tuple[int, int | str]:
    return (0, int(partition)) if partition.isdigit() else (1, partition)


def _age_s(now: int, ms: int | None) -> float | None:
    return None if ms is None else round(max(0, now - ms) / 1000, 3)


def _int(v: Any) -> int | None:
    """Integers as Redis returns them; exact beyond 2**53 (offsets), tolerant of "1.0"."""
    try:
        return None if v is None else int(v)
    except ValueError:
        f = _float(v)
        return None if f is None else int(f)


def _nulls(text: str | None) -> dict[str, int]:
    """A worker's skipped nulls per fields route (``{"routes[0]": 12}``); {} if none."""
    try:
        nulls = orjson.loads(text or "{}")
    except orjson.JSONDecodeError:
        return {}
    return (
        {str(k): v for k, v in nulls.items() if isinstance(v, int)}
        if isinstance(nulls, dict)
        else {}
    )


def _float(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except ValueError:
        return None  # not a figure we know how to read: shown as "-"


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
