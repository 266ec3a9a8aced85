"""``phonon flush``: telling running workers to expire keys now, and claiming orphans.

Timeline of one ``phonon flush --wait``::

    flush                                   worker (phonon run)
    -----                                   -------------------
                                            SUBSCRIBE <ns>:control (confirmed),
                                            then HSET its process hash flushable=1
    read live processes with flushable=1
    PUBLISH <ns>:control {id, all, globs}
                                            poll() between chunks: the request
                                            expire matching cache entries, send the
                                            batch (execute as last holder, else
                                            deposit the partial), then
                                            HSET <ns>:flush:<id>:acks <pid> <expired>
    poll the acks hash until every worker
    read before publishing has answered,
    or is gone, or the timeout passes

A worker says it listens only once its subscription is confirmed, and flush
reads the listeners before it publishes, so every worker it waits for was
subscribed when the request went out: none can miss it. Workers that start
later are not waited for (a flush is a point in time). A worker that exits
meanwhile drains its whole cache on the way out, so it is reported as gone,
not as silent.

Partials with no live holder have nobody to expire them; ``flush -c CONFIG``
executes them itself with ``update.claim_orphans`` (a script takes a partial
only if nobody holds its resource, so no key is executed twice).
"""

from __future__ import annotations

import fnmatch
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import orjson
import redis

from .. import defaults
from ..store.keys import Keys
from .status import Status

if TYPE_CHECKING:
    from ..core.process import Process
    from ..run import loop as runner

log = logging.getLogger(__name__)

ACK_TTL_S = 600
"""Seconds an acks hash outlives its last answer (a flush waits far less)."""

SUBSCRIBE_TIMEOUT_S = 5.0
"""Seconds a worker waits for its control subscription to be confirmed."""

ACK_POLL_S = 0.05
"""Seconds between reads of the acks hash while ``flush --wait`` waits."""

HELD_POLL_S = 0.1
"""Seconds between looks at the sets other processes hold while ``flush -c`` waits."""

_REQUEST_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def matcher(globs: Sequence[str], all_: bool = False) -> Callable[[str], bool]:
    """A test on resource names: fnmatch (case-sensitive) against any of ``globs``.

    One compiled regex for all globs, because workers run it on every cached key.
    """
    if all_:
        return lambda resource: True
    if not globs:
        return lambda resource: False
    pattern = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))
    return lambda resource: pattern.match(resource) is not None


@dataclass
class FlushRequest:
    """One flush, as a worker receives it (implements ``runner.FlushRequest``)."""

    id: str
    globs: list[str] = field(default_factory=list)
    all: bool = False
    client: redis.Redis | None = field(default=None, repr=False)
    keys: Keys | None = field(default=None, repr=False)
    process_id: str = ""

    def __post_init__(self) -> None:
        self._match = matcher(self.globs, self.all)

    def matches(self, resource: str) -> bool:
        return self._match(resource)

    def ack(self, expired: int) -> None:
        """Tell the flush this worker is done: its matching entries were sent."""
        if self.client is None or self.keys is None:
            return
        key = self.keys.flush_acks(self.id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, self.process_id, expired)
        pipe.expire(key, ACK_TTL_S)
        pipe.execute()

    def to_json(self) -> str:
        return orjson.dumps({"id": self.id, "all": self.all, "globs": self.globs}).decode()

    @classmethod
    def from_json(cls, data: str | bytes) -> FlushRequest | None:
        """The request in a control message, or None if it is not one (logged)."""
        try:
            raw = orjson.loads(data)
            rid, globs, all_ = raw["id"], raw.get("globs") or [], bool(raw.get("all"))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring a malformed control message: %s", e)
            return None
        if (
            not isinstance(rid, str)
            or not _REQUEST_ID.fullmatch(rid)
            or not isinstance(globs, list)
            or not all(isinstance(g, str) for g in globs)
        ):
            log.warning("ignoring a malformed flush request: %r", raw)
            return None
        return cls(rid, globs, all_)


class FlushSubscription:
    """A worker's end of the control channel (implements ``run.loop.FlushInbox``).

    The subscription has a connection of its own; ``poll`` only reads what is
    already in that socket's buffer, so an idle run loop calling it every 50 ms
    sends nothing to Redis.
    """

    def __init__(self, process: Process) -> None:
        self.process = process
        self.pubsub = process.client.pubsub()  # type: ignore[no-untyped-call]
        self.pubsub.subscribe(process.keys.control)
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
        while True:
            message = self.pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if message is not None and message["type"] == "subscribe":
                break
            if time.monotonic() >= deadline:
                log.warning("control subscription not confirmed; flush requests may be missed")
                break
        # Only now say we listen: ``flush`` waits just for processes that said so.
        process.stats["flushable"] = 1
        process.client.hset(process.keys.process(process.id), "flushable", 1)
        self._failing = False

    def poll(self) -> list[runner.FlushRequest]:
        """Requests received since the last call; ``[]`` at once when there are none."""
        out: list[runner.FlushRequest] = []
        try:
            while True:
                message = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.0)
                if message is None:
                    break
                if message.get("type") != "message":
                    continue
                request = FlushRequest.from_json(message["data"])
                if request is not None:
                    request.client = self.process.client
                    request.keys = self.process.keys
                    request.process_id = self.process.id
                    out.append(request)
            self._failing = False
        except redis.RedisError as e:
            # redis-py reconnects and resubscribes on the next call; the run goes on.
            if not self._failing:
                log.warning("control channel: %s; retrying", e)
            self._failing = True
        return out

    def close(self) -> None:
        self.process.stats.pop("flushable", None)
        try:
            self.pubsub.close()
        except redis.RedisError:
            pass


# -- the flush side -------------------------------------------------------------------


@dataclass
class Ticket:
    """A published flush request and who it was sent to."""

    request: FlushRequest
    waiting: list[str]
    """Live processes that listen: the ones to wait for."""
    deaf: list[str]
    """Live processes that do not listen (library code, not ``phonon run``)."""


@dataclass
class Answers:
    acked: dict[str, int]
    """Process id -> entries it expired."""
    gone: list[str]
    """Exited before answering (expiring everything on its way out)."""
    silent: list[dict[str, Any]]
    """Still alive, never answered: id, host and pid of each."""
    dead: list[dict[str, Any]] = field(default_factory=list)
    """Stopped answering and count as dead (killed, or paused past their TTL; declared
    dead by a survivor, or not yet): id, host and pid of each. Their caches were not
    flushed."""

    @property
    def expired(self) -> int:
        return sum(self.acked.values())


def publish_flush(
    client: redis.Redis, keys: Keys, globs: Sequence[str], all_: bool = False
) -> Ticket:
    """Send a flush request to every running worker of the namespace."""
    ids = [str(pid) for pid in client.zrange(keys.processes, 0, -1)]
    pipe = client.pipeline(transaction=False)
    for pid in ids:
        pipe.exists(keys.alive(pid))
        pipe.hget(keys.process(pid), "flushable")
    replies = pipe.execute() if ids else []
    waiting: list[str] = []
    deaf: list[str] = []
    for i, pid in enumerate(ids):
        if replies[2 * i]:
            (waiting if replies[2 * i + 1] == "1" else deaf).append(pid)
    request = FlushRequest(secrets.token_hex(8), list(globs), all_)
    client.publish(keys.control, request.to_json())
    return Ticket(request, waiting, deaf)


def wait_for_acks(
    client: redis.Redis, keys: Keys, ticket: Ticket, timeout_s: float, poll_s: float = ACK_POLL_S
) -> Answers:
    """Wait until every worker of ``ticket`` has answered or is gone, or ``timeout_s``.

    A worker declared dead meanwhile (paused past its TTL) that started over under
    a new id is not gone: it is followed to that id (``Keys.successor``), and its
    answer counts under either id. One whose alive key expired and that has not
    started over stopped answering (``Answers.dead``): killed, or still paused.
    That is told from a worker that exited on its own (``Answers.gone``, which
    unregisters itself: hash and all) by its process hash, there until a survivor
    unregisters it, and then by the mark that survivor leaves
    (``Keys.declared_dead_once``), set before the hash is deleted.
    """
    ack_key = keys.flush_acks(ticket.request.id)
    pending = set(ticket.waiting)
    first: dict[str, str] = {pid: pid for pid in pending}
    """Every id met (old and new) -> the id the ticket named."""
    who = _identities(client, keys, pending)
    gone: list[str] = []
    dead: list[str] = []
    acked: dict[str, int] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(ack_key)
        ordered = sorted(pending)
        for pid in ordered:
            pipe.exists(keys.alive(pid))
            pipe.get(keys.successor(pid))
            pipe.exists(keys.process(pid), keys.declared_dead_once(pid))
        got, *replies = pipe.execute()
        answered = {first[pid]: int(n) for pid, n in got.items() if pid in first}
        for pid in ordered:
            if first[pid] in answered:
                acked[first[pid]] = answered[first[pid]]
                pending.discard(pid)
        for pid, is_alive, successor, died in zip(
            ordered, replies[::3], replies[1::3], replies[2::3], strict=True
        ):
            if pid not in pending or is_alive:
                continue
            pending.discard(pid)
            if successor:
                first[successor] = first[pid]
                pending.add(successor)
                who.update(_identities(client, keys, [successor]))
            else:
                (dead if died else gone).append(pid)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    if pending:
        who.update(_identities(client, keys, pending))
    else:
        client.delete(ack_key)
    return Answers(
        acked,
        sorted(first[pid] for pid in gone),
        [who[pid] for pid in sorted(pending)],
        [who[pid] for pid in sorted(dead)],
    )


def _identities(client: redis.Redis, keys: Keys, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Process id -> its id, host and pid (None where its hash is gone): one round trip."""
    ordered = sorted(ids)
    pipe = client.pipeline(transaction=False)
    for pid in ordered:
        pipe.hmget(keys.process(pid), "host", "pid")
    replies = pipe.execute() if ordered else []
    return {
        pid: {"id": pid, "host": host, "pid": os_pid}
        for pid, (host, os_pid) in zip(ordered, replies, strict=True)
    }


def describe(processes: Sequence[dict[str, Any]]) -> str:
    """``ID (host H, pid P), ...``, as flush names processes."""
    return ", ".join(
        f"{p['id']} (host {p['host'] or '?'}, pid {p['pid'] or '?'})" for p in processes
    )


def orphans(status: Status, match: Callable[[str], bool]) -> Iterable[str]:
    """Resources matching ``match`` with a cached partial and no live holder."""
    live = [p["id"] for p in status.processes() if p["alive"]]
    for ref in status.references(live, match=match):
        if ref.orphaned:
            yield ref.resource


@dataclass
class Holder:
    """A process that counts as alive and holds exec sets ``flush -c`` would write:
    sets it took out to write, which only it (or, once it counts as dead, recovery)
    may write."""

    id: str
    sets: list[tuple[str, str]]
    """(resource, exec key) of each set."""
    host: str | None = None
    pid: str | None = None
    silent_s: float | None = None
    """Seconds since its last heartbeat (None: not known)."""
    alive_for_s: float | None = None
    """Seconds before its alive key expires unless it beats again (None: not known)."""

    def describe(self) -> str:
        """``process ID (host H, pid P, N sets), last heard from ... ago, counts as alive ...``"""
        heard = "" if self.silent_s is None else f", last heard from {self.silent_s:.1f}s ago"
        until = "counts as alive"
        if self.alive_for_s is not None:
            at = datetime.now(timezone.utc) + timedelta(seconds=self.alive_for_s)
            until += (
                f" for {self.alive_for_s:.1f}s more (until {at:%Y-%m-%d %H:%M:%S} UTC) "
                "unless it beats again"
            )
        return (
            f"process {self.id} (host {self.host or '?'}, pid {self.pid or '?'}, "
            f"{len(self.sets)} set(s)){heard}, {until}"
        )


def held_by_the_living(process: Process, match: Callable[[str], bool]) -> list[Holder]:
    """Exec sets of matching resources that other processes took out to write and that
    they still count as alive to do: one SCAN of the namespace's exec keys.

    A live worker holds such a set only while it writes it (a few milliseconds, or
    its retries while the database is down); one killed with kill -9 holds it until
    it counts as dead (three heartbeats), when recovery adopts and writes it. A set
    whose owner already counts as dead is recovery's, and ``claim_matching`` sees to it.
    """
    by_owner: dict[str, list[tuple[str, str]]] = {}
    pattern = process.keys.executing_pattern("*")
    for key in process.client.scan_iter(match=pattern, count=1000):
        owner, resource = Keys.executing_owner(key), process.keys.resource_of(key)
        if owner is None or resource is None or owner == process.id or not match(resource):
            continue
        by_owner.setdefault(owner, []).append((resource, key))
    alive = process.live_processes(by_owner)
    return [
        Holder(owner, sorted(sets)) for owner, sets in sorted(by_owner.items()) if owner in alive
    ]


def _still_held(process: Process, holders: list[Holder]) -> tuple[list[Holder], bool]:
    """The holders with the sets they still hold (one round trip), and whether any
    of them no longer counts as alive (then recovery can take its sets)."""
    pipe = process.client.pipeline(transaction=False)
    for holder in holders:
        pipe.exists(process.keys.alive(holder.id))
        for _, key in holder.sets:
            pipe.exists(key)
    replies = iter(pipe.execute())
    out: list[Holder] = []
    died = False
    for holder in holders:
        alive = next(replies)
        sets = [s for s in holder.sets if next(replies)]
        died = died or (not alive and bool(sets))
        if sets and alive:
            out.append(Holder(holder.id, sets))
    return out, died


def _identify(process: Process, holders: list[Holder]) -> None:
    """Fill in each holder's host, pid, silence and time left alive (one round trip)."""
    pipe = process.client.pipeline(transaction=False)
    for holder in holders:
        pipe.hmget(process.keys.process(holder.id), "host", "pid", "last_heartbeat_ms")
        pipe.pttl(process.keys.alive(holder.id))
    replies = pipe.execute()
    now = process.clock()
    for holder, (host, pid, beat), ttl_ms in zip(holders, replies[::2], replies[1::2], strict=True):
        holder.host, holder.pid = host, pid
        holder.silent_s = None if beat is None else max(0, now - int(float(beat))) / 1000
        holder.alive_for_s = None if ttl_ms is None or ttl_ms < 0 else ttl_ms / 1000


@dataclass
class Claimed:
    executed: int = 0
    left: list[str] = field(default_factory=list)
    """Orphans not executed: class or database not in the config, or its execute failed."""
    failures: int = 0
    waiting: list[str] = field(default_factory=list)
    """Orphans that could not be claimed: a dead process is still on their nodelist,
    because recovery could not run (``blocked``) or has not yet."""
    blocked: str | None = None
    """Why recovery could not run: who holds its lock, and until when."""
    quarantined: int = 0
    held: list[Holder] = field(default_factory=list)
    """Processes that count as alive holding matching sets taken out to write, still
    there when ``flush -c`` stopped waiting for them."""

    def then(self, later: Claimed) -> Claimed:
        """This pass and a later one together: what each did, and what waits after
        the later."""
        return Claimed(
            self.executed + later.executed,
            self.left + later.left,
            self.failures + later.failures,
            later.waiting,
            later.blocked,
            self.quarantined + later.quarantined,
            later.held,
        )


def claim_matching(process: Process, match: Callable[[str], bool]) -> Claimed:
    """Execute the orphaned partials that match, where the config knows their class.

    A partial is claimed only if nobody at all holds its resource, so dead
    processes still on nodelists are recovered first, exactly as any live
    worker does on its next heartbeat (``Process.recover``): that also
    executes the dead processes' own orphans, whatever their names, when
    their class is known.
    """
    from ..core.recovery import claim_orphans, recovery_lock

    stats = process.stats
    executed_before = stats.get("keys_executed", 0)
    failures_before = stats.get("execute_failures", 0)
    quarantined_before = stats.get("keys_quarantined", 0)
    process.recover()
    result = Claimed()
    status = Status(process.client, process.keys.namespace, "")
    batch: list[str] = []

    def claim(resources: list[str]) -> None:
        executed, left = claim_orphans(process, resources)
        result.left += left
        # Neither executed nor left: either taken meanwhile by a holder or another
        # process (theirs to write), or still held by a dead process (waiting).
        rest = set(resources) - set(executed) - set(left)
        if rest:
            holders = process.holders_by_resource(sorted(rest))
            live = process.live_processes({h for hs in holders.values() for h in hs})
            result.waiting += [r for r, hs in holders.items() if hs and not set(hs) & live]

    for resource in orphans(status, match):
        batch.append(resource)
        if len(batch) >= defaults.BATCH_MAX_KEYS:
            claim(batch)
            batch = []
    if batch:
        claim(batch)
    result.executed = stats.get("keys_executed", 0) - executed_before
    result.failures = stats.get("execute_failures", 0) - failures_before
    result.quarantined = stats.get("keys_quarantined", 0) - quarantined_before
    if result.waiting:
        lock = recovery_lock(process.client, process.keys)
        if lock is not None and lock.owner != process.id:
            result.blocked = lock.describe()
    return result


def claim_waiting(
    process: Process,
    match: Callable[[str], bool],
    timeout_s: float,
    say: Callable[[str], None],
    poll_s: float = HELD_POLL_S,
) -> Claimed:
    """``claim_matching``, then wait up to ``timeout_s`` for the matching sets other
    processes took out to write (``held_by_the_living``): each is either written by
    its owner, which then forgets it, or its owner counts as dead (killed: its alive
    key expired), and recovery, run again at once, adopts and writes it. What still
    waits after ``timeout_s`` is in ``Claimed.held``, its owners described.

    Without this, ``flush -c`` run right after a kill -9 found the killed worker's
    sets held by a process that still counted as alive, wrote nothing, and said
    "executed 0" with an exit code of 0.
    """
    claimed = claim_matching(process, match)
    held = held_by_the_living(process, match)
    if held and timeout_s > 0:
        sets = sum(len(h.sets) for h in held)
        say(
            f"{sets:,} set(s) are being written by {len(held)} other process(es); waiting up "
            f"to {timeout_s:g}s for them to be written, or for their holders to count as dead"
        )
    deadline = time.monotonic() + timeout_s
    while held and time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        held, died = _still_held(process, held)
        if died:
            claimed = claimed.then(claim_matching(process, match))
            held = held_by_the_living(process, match)
    _identify(process, held)
    claimed.held = held
    return claimed


# -- the whole command ----------------------------------------------------------------


def flush(
    client: redis.Redis,
    keys: Keys,
    globs: Sequence[str],
    all_: bool,
    *,
    wait_s: float | None,
    executor: Callable[[], Process] | None,
    held_timeout_s: float = 0.0,
    config_name: str = "the config",
    say: Callable[[str], None],
    show: Callable[[str], None],
) -> list[str]:
    """``phonon flush``: ask running workers to expire what matches, then deal with
    orphans: execute them with ``executor()`` (a process knowing the config's
    classes, stopped here) or, without one, list them. Returns the problems that
    make the command fail (silent workers, failed executes).

    With an executor, sets other processes took out to write are waited for up to
    ``held_timeout_s`` (``claim_waiting``).

    ``say`` gets the progress lines as they happen, so a user watching a long
    ``--wait`` sees the request go out before the answers come back; ``show`` gets
    the orphans not executed, one resource each (data, for stdout).
    """
    problems: list[str] = []
    match = matcher(globs, all_)
    ticket = publish_flush(client, keys, globs, all_)
    say(f"flush {ticket.request.id} sent to {len(ticket.waiting)} running worker(s)")
    if ticket.deaf:
        say(
            f"{len(ticket.deaf)} live process(es) take no flush requests (not 'phonon run'): "
            + ", ".join(ticket.deaf)
        )
    if wait_s is not None:
        answers = wait_for_acks(client, keys, ticket, wait_s)
        say(
            f"{len(answers.acked)} worker(s) expired {answers.expired:,} entries"
            + (f"; {len(answers.gone)} exited meanwhile" if answers.gone else "")
            + (f"; {len(answers.dead)} stopped answering" if answers.dead else "")
        )
        if answers.dead:
            problems.append(
                f"{len(answers.dead)} worker(s) stopped answering: {describe(answers.dead)}; "
                "its alive key expired before it answered (killed, or paused past its TTL), "
                "so it counts as dead: what it held in redis goes to a survivor (or to "
                "flush -c), what it held only in memory was not flushed"
            )
        if answers.silent:
            problems.append(
                f"{len(answers.silent)} worker(s) did not answer within {wait_s:g}s: "
                + describe(answers.silent)
            )
    if executor is None:
        listed = list(orphans(Status(client, keys.namespace, ""), match))
        for resource in listed:
            show(resource)
        if listed:
            say(
                f"{len(listed):,} orphaned partial(s) listed above have no live holder; "
                "execute them with: phonon flush -c CONFIG ..."
            )
        return problems
    process = executor()
    try:
        claimed = claim_waiting(process, match, held_timeout_s, say)
    finally:
        process.stop()
    return problems + _report_claimed(claimed, config_name, say, show)


def _report_claimed(
    claimed: Claimed, config_name: str, say: Callable[[str], None], show: Callable[[str], None]
) -> list[str]:
    """Say what ``flush -c`` did with the orphans; return the problems (exit 1)."""
    problems: list[str] = []
    say(f"executed {claimed.executed:,} orphaned partial(s)")
    for resource in claimed.left:
        show(resource)
    if claimed.left:
        say(
            f"{len(claimed.left):,} orphaned partial(s) listed above were not executed "
            f"(class or database not in {config_name}, or its execute failed)"
        )
    if claimed.quarantined:
        say(
            f"{claimed.quarantined:,} could never be written and were quarantined "
            "(see: phonon quarantine list)"
        )
    if claimed.failures:
        problems.append(
            f"{claimed.failures} orphaned partial(s) could not be written; they are kept in redis"
        )
    if claimed.held:
        for holder in claimed.held:
            for resource, _ in holder.sets:
                show(resource)
        sets = sum(len(h.sets) for h in claimed.held)
        problems.append(
            f"{sets:,} set(s) listed above were taken out to write by a process that "
            "still counts as alive, so only it may write them: "
            + "; ".join(h.describe() for h in claimed.held)
            + ". If it was killed, they are recovered once it counts as dead: run this "
            "again then, or with a --timeout that lasts past it"
        )
    if claimed.waiting:
        for resource in claimed.waiting:
            show(resource)
        why = claimed.blocked or "recovery has not released them yet"
        problems.append(
            f"{len(claimed.waiting):,} orphaned partial(s) listed above wait on a dead "
            f"process's recovery: {why}; run this again then"
        )
    return problems
