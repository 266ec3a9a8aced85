"""Every Redis key phonon uses is built here, and only here.

Keys are ``<namespace>:<kind>:<id>``. The keys of one resource share a Redis
Cluster hash tag (``{<resource>}``) so that a script touching one resource
only ever touches one slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot


@dataclass(frozen=True)
class ResourceKeys:
    """The keys that make up one resource's shared state."""

    nodes: str
    """Hash: process id -> when it took its reference (epoch ms), for every holder."""
    meta: str
    """Hash: times_modified, the partial's kind and how to rebuild it, timestamps."""
    partials: str
    """List of JSON partials (``Update``) or hash of sums (``ConflictFreeUpdate``)."""
    lock: str
    seen: str
    """Hash, expiring: source partition -> the highest offset of this resource's
    events already safe in Redis or being written (scripts.RELEASE_LUA's MARKS)."""
    """String: the token of the lock's owner, with a PX expiry."""
    quarantine: str
    """List of JSON records: aggregates that could never be merged or written, each
    with its recipe, payload and error (``core.quarantine``, ``phonon quarantine``)."""

    base: str

    def executing(self, process_id: str, seq: int) -> tuple[str, str]:
        """Partials a last holder took out to execute, and their recipe.

        They are kept until the write is done, so that recovery can put them back
        if the process dies in between. ``seq`` makes each execution's keys unique.
        """
        key = f"{self.base}:exec:{process_id}:{seq}"
        return key, f"{key}:recipe"


class Keys:
    """Key names for one namespace."""

    def __init__(self, namespace: str) -> None:
        if not namespace or any(c in namespace for c in "{}*?[] "):
            raise ValueError(f"invalid namespace {namespace!r}")
        self.namespace = namespace
        # Every process-level key shares one hash tag, the namespace's: on a Redis
        # Cluster the scripts that touch several of them (HEARTBEAT, DECLARE_DEAD,
        # FENCE_HELD) then touch one slot.
        procs = f"{namespace}:{{{namespace}}}"
        self._procs = procs
        self.processes = f"{procs}:processes"
        """Sorted set: process id -> last heartbeat (epoch ms). Every process not yet cleaned up."""
        self.store_id = f"{procs}:store-id"
        """String: a random id the namespace's first process sets. A worker that finds
        it gone or changed knows the store was reset (a restart without persistence,
        FLUSHALL) and that what it held there is lost."""
        self.highest_marks = f"{procs}:highest-marks"
        """Hash: source partition -> the highest offset any resource's mark covers: a
        worker reading a partition below it checks marks; above it, nothing to check."""
        self.declared_dead = f"{procs}:declared-dead"
        """Set: processes declared dead (out of ``processes``, fenced) whose recovery
        is not finished; a survivor that dies half way leaves them to the next."""
        self.stranded = f"{procs}:stranded"
        """Set: exec keys of sets taken by processes now dead, whose survivor did not
        know their class: left whole, with their execution id, for a process that
        does (recovery, ``flush -c``) to adopt."""
        self.recovery_lock = f"{namespace}:maintenance:recovery"
        """String, SET NX EX: only one survivor recovers dead processes at a time."""
        self.control = f"{namespace}:control"
        """Pub/sub channel: flush requests to running workers."""

    def resource(self, resource: str) -> ResourceKeys:
        base = f"{self.namespace}:ref:{{{resource}}}"
        return ResourceKeys(
            nodes=f"{base}:nodes",
            meta=f"{base}:meta",
            partials=f"{base}:partials",
            lock=f"{base}:lock",
            seen=f"{base}:seen",
            quarantine=f"{base}:quarantine",
            base=base,
        )

    def holding(self, resource: str) -> tuple[str, str, str]:
        """``resource(resource)``'s nodes, meta and partials, and nothing else: the
        sole holder's release (``scripts.RELEASE_ALONE``) needs only these, per key."""
        base = f"{self.namespace}:ref:{{{resource}}}"
        return f"{base}:nodes", f"{base}:meta", f"{base}:partials"

    def resource_of(self, key: str) -> str | None:
        """The resource named by one of its keys, or None for any other key."""
        prefix = f"{self.namespace}:ref:{{"
        if not key.startswith(prefix):
            return None
        end = key.rfind("}:")
        return key[len(prefix) : end] if end >= len(prefix) else None

    def resource_pattern(self, kind: str = "meta") -> str:
        """A SCAN pattern matching one kind of key of every resource."""
        return f"{self.namespace}:ref:*:{kind}"

    def executing_pattern(self, process_id: str) -> str:
        """A SCAN pattern matching every execution a process left unfinished."""
        return f"{self.namespace}:ref:*:exec:{process_id}:*"

    @staticmethod
    def is_recipe(key: str) -> bool:
        return key.endswith(":recipe")

    @staticmethod
    def executing_owner(key: str) -> str | None:
        """The process that took the set in an exec key (``ResourceKeys.executing``),
        or None for any other key (its recipe key included)."""
        parts = key.rsplit(":", 3)
        if len(parts) == 4 and parts[1] == "exec" and parts[3].isdigit():
            return parts[2]
        return None

    def process(self, process_id: str) -> str:
        """Hash: host, pid, started_ms, last heartbeat and the figures status shows."""
        return f"{self._procs}:process:{process_id}"

    def alive(self, process_id: str) -> str:
        """String with a TTL of three heartbeats: a process is alive while it exists."""
        return f"{self._procs}:process:{process_id}:alive"

    def replies(self, process_id: str) -> str:
        """Hash, expiring: slot -> the batch id and reply of the last script call in it,
        so a call sent again after a lost reply is answered without running twice."""
        return f"{self._procs}:process:{process_id}:replies"

    def slot_replies(self, process_id: str) -> str:
        """On a Redis Cluster, ``replies`` per hash slot: a template whose ``{}`` the
        per-slot split fills with a tag of the call's slot (``in_slot``), so that each
        per-slot call of a batch keeps its reply in its own slot. Hashes, expiring an
        hour after their last write; recovery deletes a dead process's
        (``slot_replies_pattern``)."""
        return f"{self.namespace}:replies:{{}}:{process_id}"

    def slot_replies_pattern(self, process_id: str) -> str:
        """A SCAN pattern matching every ``slot_replies`` hash of one process."""
        return f"{self.namespace}:replies:*:{process_id}"

    def successor(self, process_id: str) -> str:
        """String, expiring: the new id of a process that was declared dead and started
        over under it (``Process.reregister``), so that a ``flush --wait`` sent to the
        old id waits for the new one."""
        return f"{self._procs}:process:{process_id}:successor"

    def declared_dead_once(self, process_id: str) -> str:
        """String, expiring: set when a survivor unregisters a process it declared dead
        (``recovery.unregister``), so that a ``flush --wait`` that was waiting for it
        can tell it stopped answering from a process that exited on its own."""
        return f"{self._procs}:process:{process_id}:declared-dead"

    def held(self, process_id: str) -> str:
        """Set of resources a process holds (or is executing): what recovery must visit."""
        return f"{self._procs}:process:{process_id}:held"

    def lock(self, name: str) -> str:
        """A free-standing lock taken with ``Process.lock``."""
        return f"{self.namespace}:lock:{{{name}}}"

    def offsets(self, group: str, source: str) -> str:
        """Hash: partition -> committed offset for one consumer group and source."""
        return f"{self.namespace}:offsets:{group}:{source}"

    def members(self, group: str, source: str) -> str:
        """Hash: partition -> process id owning it."""
        return f"{self.namespace}:members:{group}:{source}"

    def offsets_pattern(self) -> str:
        """A SCAN pattern matching the committed offsets of every group and source."""
        return f"{self.namespace}:offsets:*"

    def offsets_of(self, key: str) -> tuple[str, str] | None:
        """``(group, source)`` of an ``offsets`` key, or None for any other key.

        A group never contains ``:`` (a source may: ``file:PATH``), so the first
        ``:`` after the prefix separates them.
        """
        prefix = f"{self.namespace}:offsets:"
        if not key.startswith(prefix):
            return None
        group, sep, source = key[len(prefix) :].partition(":")
        return (group, source) if sep and group and source else None

    def flush_acks(self, request_id: str) -> str:
        """Hash, with an expiry: process id -> entries it expired for one flush request."""
        return f"{self.namespace}:flush:{request_id}:acks"

    def consumers(self, group: str, source: str) -> str:
        """Sorted set: process id -> last seen (epoch ms), the workers of a consumer group
        reading one source. A member whose process is dead is pruned by the survivors (and,
        for a stream, its pending entries claimed first)."""
        return f"{self.namespace}:consumers:{group}:{source}"

    def source_info(self, group: str, source: str) -> str:
        """Hash: partition -> JSON, what ``phonon status`` shows of a source.

        File partitions: ``{"committed", "end", "read", "owner", "updated_ms"}``: lines
        behind = end - committed. Streams (field = the stream key): ``{"pending", "lag",
        "last_delivered_id", "consumers", "updated_ms"}``. Pub/sub (field = the channel):
        ``{"owner", "received", "updated_ms"}``.
        """
        return f"{self.namespace}:source-info:{group}:{source}"

    def stream_lineage(self, group: str, source: str) -> str:
        """Hash, expiring with the marks (7 days): a consumer a stream's entries were
        claimed into -> the dead consumer they were claimed from. A claimed entry was
        counted on a key if the marks of any consumer up that line cover it: one that
        only skipped it (counted before) marks nothing for it."""
        return f"{self.namespace}:stream-lineage:{group}:{source}"

    def source_lock(self, group: str, source: str, partition: str) -> str:
        """String lock (token, PX): the one worker of a group reading a partition (or, for
        pub/sub, subscribed; for a stream, claiming dead consumers' entries)."""
        return f"{self.namespace}:source-lock:{group}:{source}:{partition}"


_slot_tags: list[str] = []


def in_slot(template: str, slot: int) -> str:
    """``template`` (see ``Keys.slot_replies``) made a key of hash slot ``slot``: its
    ``{}`` becomes a hash tag that hashes to that slot."""
    if not _slot_tags:
        _slot_tags.extend(_tags())
    return template.replace("{}", f"{{{_slot_tags[slot]}}}", 1)


def _tags() -> list[str]:
    """For each slot, the first decimal number whose text hashes to it (about 170,000
    CRC16s of a few bytes, once per process, on a cluster only)."""
    tags: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
    missing = REDIS_CLUSTER_HASH_SLOTS
    n = 0
    while missing:
        text = str(n)
        slot = key_slot(text.encode())
        if tags[slot] is None:
            tags[slot] = text
            missing -= 1
        n += 1
    return [t for t in tags if t is not None]
