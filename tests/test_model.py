"""Who may apply what: a model of fencing and idempotent executes, checked against
the real scripts on a real Redis and a real SQLite sink.

Hypothesis drives a few processes through any interleaving of the protocol's
steps: take a key and count events in memory, leave it (deposit, or take as
last holder), execute what was taken (sometimes twice under its execution id,
as a zombie and a survivor would), lose a batch's reply, declare a process
dead, let the dead one try again, kill one outright (sometimes between the
database commit and the Redis cleanup), recover the dead, claim orphans, and
start a fenced process over under a new id. A small pure-Python model says
what each step must do: whose scripts are refused, what Redis holds, and what
the database holds. After every step the database equals the model (nothing
applied twice, nothing a live or recovered deposit carried left out), and once
everything is drained it holds every event except those that were only in a
killed process's memory.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
from collections import Counter as Tally
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from phonon_cli import faults
from phonon_cli.core import recovery
from phonon_cli.core.process import Process
from phonon_cli.core.reference import (
    Release,
    Taken,
    acquire_many,
    release_many,
    send_release_many,
)
from phonon_cli.core.update import Update, execute_taken
from phonon_cli.exceptions import Fenced
from phonon_cli.ops.status import Status, render
from phonon_cli.sinks import discard
from phonon_cli.sinks.jsonl import Lines
from phonon_cli.sinks.sql import Counter

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PROCESSES = 3
KEYS = ("a", "b")
STRANDED = "stranded"
"""The owner, in the model, of a set whose dead owner's survivor did not know its class."""
RUNS = itertools.count()
"""Each example gets a namespace and keys of its own (one database for the test)."""


@dataclass
class Slot:
    """One worker as the model sees it; ``process`` is the real one."""

    process: Process
    memory: dict[str, Counter] = field(default_factory=dict)
    """Keys held, with what was counted and not yet deposited or taken."""
    taken: list[tuple[Counter, Taken, int]] = field(default_factory=list)
    """Taken as last holder, not yet executed: (update, what was taken, its total)."""
    dead: bool = False
    """Declared dead (fenced) and not started over: a zombie."""


@dataclass
class Model:
    put: Tally[str] = field(default_factory=Tally)
    """Events counted into some process's memory."""
    lost: Tally[str] = field(default_factory=Tally)
    """Events only a killed process had: gone, as promised for non-replayable sources."""
    holders: dict[str, set[str]] = field(default_factory=dict)
    """Who is on each key's nodelist, dead or alive, until recovery removes them."""
    deposited: Tally[str] = field(default_factory=Tally)
    exec_sets: dict[str, tuple[str, int, str]] = field(default_factory=dict)
    """Taken sets in Redis, by execution id: (key, total, the id that took them)."""
    applied: Tally[str] = field(default_factory=Tally)
    applied_ids: set[str] = field(default_factory=set)
    unrecovered: set[str] = field(default_factory=set)
    """Ids declared dead or killed whose recovery has not run."""

    def apply(self, key: str, amount: int, eid: str | None) -> None:
        """A write: once per execution id; a set with no id was only in memory."""
        if eid is None or eid not in self.applied_ids:
            self.applied[key] += amount
        if eid is not None:
            self.applied_ids.add(eid)


class Fencing(RuleBasedStateMachine):
    """The protocol's steps as rules; the test binds the store and the database."""

    redis_url: ClassVar[str]
    namespace: ClassVar[str]
    db: ClassVar[Path]

    def __init__(self) -> None:
        super().__init__()
        self.database = f"sqlite:///{self.db}"
        run = next(RUNS)
        self.ns = f"{self.namespace}:m{run}"
        self.prefix = f"r{run}-"
        self.model = Model()
        self.corpses: list[Process] = []
        self.slots = [Slot(self.start()) for _ in range(PROCESSES)]

    # -- helpers ------------------------------------------------------------------

    def start(self, cls: type[Update] = Counter) -> Process:
        # Heartbeats by hand and a TTL of hours: a process dies only when a rule
        # says so (its alive key deleted), never because the machine was slow.
        p = Process(
            self.redis_url,
            namespace=self.ns,
            heartbeat_interval=3600,
            start_heartbeat=False,
            recover_failed_processes=False,
        )
        p.register(cls)
        p.register_database(self.database)
        return p

    def key(self, k: str) -> str:
        return self.prefix + k

    def update(self, p: Process, key: str, n: int) -> Counter:
        return Counter(
            p, key, database=self.database, collection="t", spec={"k": key}, doc={"c": n}
        )

    def apply_recovery(self, knows: bool = True) -> None:
        """What recovering every unrecovered id must do: adopt its exec sets and
        those stranded before (executed under their own ids), leave its nodelists,
        execute orphans. A survivor that does not know the class executes nothing:
        it strands the sets, whole, and leaves the orphans."""
        m = self.model
        for eid, (key, amount, owner) in list(m.exec_sets.items()):
            if owner in m.unrecovered or (knows and owner == STRANDED):
                if knows:
                    m.apply(key, amount, eid)
                    del m.exec_sets[eid]
                else:
                    m.exec_sets[eid] = (key, amount, STRANDED)
        for key, holders in m.holders.items():
            if holders & m.unrecovered:
                holders -= m.unrecovered
                if knows and not holders and m.deposited[key]:
                    m.apply(key, m.deposited.pop(key), None)
        m.unrecovered.clear()

    def recovery_waits(self) -> bool:
        m = self.model
        return bool(m.unrecovered) or any(o == STRANDED for _, _, o in m.exec_sets.values())

    # -- rules --------------------------------------------------------------------
    # Each rule runs only when it can do something (``precondition``), and picks
    # among the slots it applies to, so that examples stay short and dense.

    def holding(self) -> list[Slot]:
        return [s for s in self.slots if s.memory and not s.dead]

    def executing(self) -> list[Slot]:
        return [s for s in self.slots if s.taken]

    def living(self) -> list[Slot]:
        return [s for s in self.slots if not s.dead]

    def zombies(self) -> list[Slot]:
        return [s for s in self.slots if s.dead]

    @initialize(
        counts=st.lists(
            st.integers(0, 3), min_size=PROCESSES * len(KEYS), max_size=PROCESSES * len(KEYS)
        )
    )
    def share(self, counts: list[int]) -> None:
        """Start with most keys held by several processes: that is where sets
        are deposited, taken and fought over."""
        for n, (slot, k) in zip(counts, itertools.product(self.slots, KEYS)):
            if n:
                self.count_event(slot, self.key(k), n)

    @rule(i=st.integers(0, PROCESSES - 1), k=st.sampled_from(KEYS), n=st.integers(1, 5))
    def count(self, i: int, k: str, n: int) -> None:
        """An event for key k reaches process i: merged in memory, or a new
        reference taken (refused for a dead process)."""
        self.count_event(self.slots[i], self.key(k), n)

    def count_event(self, slot: Slot, key: str, n: int) -> None:
        if key in slot.memory:
            slot.memory[key].doc["c"] += n
        elif slot.dead:
            with pytest.raises(Fenced):
                self.update(slot.process, key, n)
            return
        else:
            slot.memory[key] = self.update(slot.process, key, n)
            self.model.holders.setdefault(key, set()).add(slot.process.id)
        self.model.put[key] += n

    @precondition(lambda self: self.holding())
    @rule(
        pick=st.integers(0, 99),
        mode=st.sampled_from(["end", "end", "cache"]),
        lost_reply=st.booleans(),
    )
    def leave(self, pick: int, mode: str, lost_reply: bool) -> None:
        """A live process leaves a key: deposits, or as last holder takes every
        partial. A lost reply makes the batch go out again: it must apply once."""
        slots = self.holding()
        slot = slots[pick % len(slots)]
        key = sorted(slot.memory)[pick % len(slot.memory)]
        self.leave_key(slot, key, mode, lost_reply)

    @precondition(lambda self: self.holding())
    @rule(pick=st.integers(0, 99))
    def leave_more(self, pick: int) -> None:
        """The same, twice as likely: ending sessions is where sets are taken."""
        self.leave(pick, "end", False)

    @precondition(lambda self: self.holding())
    @rule(pick=st.integers(0, 99), lost_reply=st.booleans())
    def leave_alone(self, pick: int, lost_reply: bool) -> None:
        """The run loop's way: the sole holder's release first (RELEASE_ALONE), which
        leaves the key only if nobody else holds it and no partial waits; else the
        key is left untouched and goes the full way."""
        slots = self.holding()
        slot = slots[pick % len(slots)]
        key = sorted(slot.memory)[pick % len(slot.memory)]
        u = slot.memory[key]
        faults.plan("lost-reply:drop" if lost_reply else "")
        try:
            _, (left,) = send_release_many(slot.process, [], alone=[u.resource])()
        finally:
            faults.plan("")
        m = self.model
        alone = not (m.holders[key] - {slot.process.id}) and not m.deposited.get(key, 0)
        assert left == alone
        if not left:
            self.leave_key(slot, key, "end", False)
            return
        del slot.memory[key]
        m.holders[key].discard(slot.process.id)
        slot.taken.append((u, Taken(u.kind, "", [], ("", "")), u.doc["c"]))

    @precondition(lambda self: any(s.dead and s.memory for s in self.slots))
    @rule(pick=st.integers(0, 99), mode=st.sampled_from(["end", "cache"]))
    def zombie_leaves(self, pick: int, mode: str) -> None:
        """A dead process tries to deposit or take: refused, it keeps its memory."""
        slots = [s for s in self.slots if s.dead and s.memory]
        slot = slots[pick % len(slots)]
        self.leave_key(slot, sorted(slot.memory)[pick % len(slot.memory)], mode, False)

    def leave_key(self, slot: Slot, key: str, mode: str, lost_reply: bool) -> None:
        u = slot.memory[key]
        rel = Release(u.resource, mode, u.kind, u.recipe(), u.payload())  # type: ignore[arg-type]
        if slot.dead:
            with pytest.raises(Fenced):
                release_many(slot.process, [rel])
            return
        faults.plan("lost-reply:drop" if lost_reply else "")
        try:
            (taken,) = release_many(slot.process, [rel])
        finally:
            faults.plan("")
        del slot.memory[key]
        m, mine = self.model, u.doc["c"]
        holders = m.holders[key]
        holders.discard(slot.process.id)
        if mode == "cache" or holders:
            assert taken is None
            m.deposited[key] += mine
            return
        assert taken is not None
        others = m.deposited.pop(key, 0)
        assert (taken.execution_id is None) == (others == 0)
        u.absorb(taken.kind, taken.items)
        u.execution_id = taken.execution_id
        assert u.doc["c"] == mine + others
        if taken.execution_id is not None:
            m.exec_sets[taken.execution_id] = (key, mine + others, slot.process.id)
        slot.taken.append((u, taken, mine + others))

    @precondition(lambda self: self.executing())
    @rule(pick=st.integers(0, 99), twice=st.booleans())
    def execute(self, pick: int, twice: bool) -> None:
        """A process (alive or a zombie) writes a set it took, then forgets it in
        Redis; ``twice`` writes it once more first under the same id."""
        slots = self.executing()
        self.execute_set(slots[pick % len(slots)], pick, twice)

    def execute_set(self, slot: Slot, pick: int, twice: bool) -> None:
        u, taken, amount = slot.taken.pop(pick % len(slot.taken))
        key = u.spec["k"]
        if twice and u.execution_id is not None:
            assert Counter.execute_many([u]) == []
            self.model.apply(key, amount, u.execution_id)
        assert execute_taken(slot.process, [(u, taken)]) == {u}
        self.model.apply(key, amount, taken.execution_id)
        if taken.execution_id is not None:
            self.model.exec_sets.pop(taken.execution_id, None)

    @precondition(lambda self: len(self.living()) >= 2)
    @rule(pick=st.integers(0, 99), by=st.integers(1, PROCESSES - 1))
    def declare_dead(self, pick: int, by: int) -> None:
        """A process falls silent past its TTL (a pause) and another declares it
        dead: fenced, its heartbeat refused, though it still runs."""
        slots = self.living()
        slot, survivor = slots[pick % len(slots)], slots[(pick + by) % len(slots)]
        if slot is survivor:
            survivor = slots[(pick + 1) % len(slots)]
        p = slot.process
        p.client.delete(p.keys.alive(p.id))
        assert p.id in recovery.declare_dead(survivor.process, [p.id])
        assert p.heartbeat() is False
        slot.dead = True
        self.model.unrecovered.add(p.id)

    @precondition(lambda self: any(s.memory or s.taken for s in self.slots))
    @rule(pick=st.integers(0, 99), commit_first=st.booleans())
    def kill(self, pick: int, commit_first: bool) -> None:
        """A process holding something is killed (kill -9) and a new one takes its place; with
        ``commit_first`` it dies after a database commit, before forgetting the
        set in Redis. What only its memory held is lost."""
        slots = [s for s in self.slots if s.memory or s.taken]
        slot = slots[pick % len(slots)]
        p, m = slot.process, self.model
        if commit_first and any(t.execution_id for _, t, _ in slot.taken):
            u, taken, amount = next(x for x in slot.taken if x[1].execution_id)
            assert Counter.execute_many([u]) == []
            m.apply(u.spec["k"], amount, taken.execution_id)
        for key, u in slot.memory.items():
            m.lost[key] += u.doc["c"]
        for u, taken, amount in slot.taken:
            if taken.execution_id is None:  # nothing of it in Redis
                m.lost[u.spec["k"]] += amount
        if not slot.dead:  # a zombie's id is recovered, or waits for it, already
            p.client.delete(p.keys.alive(p.id))
            m.unrecovered.add(p.id)
        p.client.close()
        self.corpses.append(p)
        self.slots[self.slots.index(slot)] = Slot(self.start())

    @precondition(lambda self: self.recovery_waits() and self.living())
    @rule(pick=st.integers(0, 99))
    def recover(self, pick: int) -> None:
        """A live process recovers every dead one (killed ones are declared dead
        first), adopting their exec sets and executing orphans."""
        slots = self.living()
        self.recover_by(slots[pick % len(slots)])

    def recover_by(self, survivor: Slot) -> None:
        recovered = recovery.recover(survivor.process)
        assert recovered == len(self.model.unrecovered)
        self.apply_recovery()

    @precondition(lambda self: self.model.unrecovered)
    @rule()
    def recover_by_stranger(self) -> None:
        """A survivor whose config names other classes recovers the dead: it can
        execute none of their sets, so it keeps them whole, with their ids."""
        p = self.start(Lines)
        try:
            assert recovery.recover(p) == len(self.model.unrecovered)
        finally:
            p.stop()
            p.client.close()
        self.apply_recovery(knows=False)

    @precondition(lambda self: self.zombies())
    @rule(pick=st.integers(0, 99))
    def start_over(self, pick: int) -> None:
        """A fenced process goes on under a new id with what only its memory holds."""
        slots = self.zombies()
        self.start_over_slot(slots[pick % len(slots)])

    def start_over_slot(self, slot: Slot) -> None:
        slot.process.reregister()
        acquire_many(slot.process, [u.resource for u in slot.memory.values()])
        slot.dead = False
        for key in slot.memory:
            self.model.holders[key].add(slot.process.id)

    def orphaned(self) -> list[str]:
        m = self.model
        return [k for k in m.deposited if m.deposited[k] and not m.holders.get(k)]

    @precondition(lambda self: self.orphaned() and self.living())
    @rule(pick=st.integers(0, 99))
    def claim_orphans(self, pick: int) -> None:
        """``phonon flush -c``: partials nobody holds (not even a dead process
        still on the nodelist) are executed."""
        slots = self.living()
        self.claim_orphans_by(slots[pick % len(slots)])

    def claim_orphans_by(self, slot: Slot) -> None:
        recovery.claim_orphans(slot.process, [f"t:{self.key(k)}" for k in KEYS])
        for key in self.orphaned():
            self.model.apply(key, self.model.deposited.pop(key), None)

    # -- what must hold -----------------------------------------------------------

    def written(self) -> Tally[str]:
        conn = sqlite3.connect(self.db)
        try:
            rows = conn.execute("SELECT k, c FROM t WHERE k LIKE ?", (self.prefix + "%",))
            return Tally(dict(rows.fetchall()))
        except sqlite3.OperationalError as e:
            assert "no such table" in str(e)
            return Tally()
        finally:
            conn.close()

    @invariant()
    def database_and_redis_agree_with_the_model(self) -> None:
        assert self.written() == +self.model.applied
        client = self.slots[0].process.client
        keys = self.slots[0].process.keys
        pipe = client.pipeline(transaction=False)
        for k in KEYS:
            pipe.hget(keys.resource(f"t:{self.key(k)}").partials, "c")
        cached = Tally({self.key(k): int(c) for k, c in zip(KEYS, pipe.execute()) if c})
        assert cached == +self.model.deposited

    def teardown(self) -> None:
        try:
            self.drain()
        finally:
            for slot in self.slots:
                slot.process.stop()
                slot.process.client.close()
            for p in self.corpses:
                p._heartbeat_client.close()

    def drain(self) -> None:
        """Everything out: zombies write what they took and start over, every
        process leaves every key, the dead are recovered, orphans claimed. Then
        the database holds every event but those a killed process took along."""
        for slot in self.slots:
            while slot.taken:
                self.execute_set(slot, 0, False)
            if slot.dead:
                self.start_over_slot(slot)
        for slot in self.slots:
            while slot.memory:
                self.leave_key(slot, min(slot.memory), "end", False)
                while slot.taken:
                    self.execute_set(slot, 0, False)
        if self.recovery_waits():
            self.recover_by(self.slots[0])
        self.claim_orphans_by(self.slots[0])
        self.database_and_redis_agree_with_the_model()
        assert self.written() == +(self.model.put - self.model.lost)
        client = self.slots[0].process.client
        left = list(client.scan_iter(match=f"{self.ns}:ref:*", count=1000))
        assert left == [], left


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "model.db"
    yield path
    discard(f"sqlite:///{path}")


@pytest.mark.timeout(240 if CI else 120)  # more examples under CI
def test_fencing_and_idempotency_follow_the_model(redis_url: str, namespace: str, db: Path) -> None:
    bound = {"redis_url": redis_url, "namespace": namespace, "db": db}
    run_state_machine_as_test(
        type("Bound", (Fencing,), bound),
        settings=settings(
            max_examples=60 if CI else 25,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# -- a survivor that does not know the class --------------------------------------------


def stranger(make_process: Any) -> Process:
    """A survivor whose config names other classes only."""
    p = make_process(start_heartbeat=False, recover_failed_processes=False, heartbeat_interval=3600)
    p.register(Lines)
    return p


def take_a_set(zombie: Process, other: Process, db: Path, c: int) -> tuple[Counter, Taken]:
    """``other`` deposits c, then ``zombie`` (last holder, c too) takes the set."""
    database = f"sqlite:///{db}"
    spec = {"k": "x"}
    mine = Counter(zombie, "x", database=database, collection="t", spec=spec, doc={"c": c})
    theirs = Counter(other, "x", database=database, collection="t", spec=spec, doc={"c": c})
    assert release_many(
        other, [Release(theirs.resource, "end", "sums", theirs.recipe(), theirs.payload())]
    ) == [None]
    (taken,) = release_many(
        zombie, [Release(mine.resource, "end", "sums", mine.recipe(), mine.payload())]
    )
    assert taken is not None and taken.execution_id is not None
    mine.absorb(taken.kind, taken.items)
    mine.execution_id = taken.execution_id
    return mine, taken


def declared_dead(zombie: Process, by: Process) -> None:
    zombie.client.delete(zombie.keys.alive(zombie.id))
    assert zombie.id in recovery.declare_dead(by, [zombie.id])


def test_a_set_no_survivor_knows_keeps_its_id_and_is_written_once(
    make_process: Any, client: Any, db: Path
) -> None:
    """The zombie writes its set after a survivor that did not know the class
    recovered it; a process that knows the class then adopts it: written once."""
    zombie, other = (make_process(start_heartbeat=False, heartbeat_interval=3600) for _ in range(2))
    update, taken = take_a_set(zombie, other, db, 3)
    survivor = stranger(make_process)
    declared_dead(zombie, survivor)
    assert recovery.recover(survivor) == 1
    exec_key = taken.exec_keys[0]
    assert client.smembers(zombie.keys.stranded) == {exec_key}
    assert client.hgetall(exec_key) == {"c": "6"}  # whole, not merged into the partials
    snap = Status(client, zombie.keys.namespace, "").snapshot(10)
    assert snap.totals.stranded == 1
    assert "stranded: 1 set(s)" in render(snap)
    assert not client.exists(zombie.keys.resource(update.resource).partials)
    assert Counter.execute_many([update]) == []  # the zombie writes it (no finish: it was killed)
    other.register_database(f"sqlite:///{db}")
    assert recovery.recover(other) == 0  # nobody dead: adopts what was stranded
    assert client.smembers(zombie.keys.stranded) == set()
    assert Status(client, zombie.keys.namespace, "").snapshot(10).totals.stranded == 0
    assert client.keys(f"{zombie.keys.namespace}:ref:*") == []
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT k, c FROM t").fetchall() == [("x", 6)]
    finally:
        conn.close()


def test_a_set_that_would_overflow_the_partials_is_kept_apart(
    make_process: Any, client: Any, db: Path
) -> None:
    """Merging a dead process's set back into partials whose sum Redis cannot hold
    failed the whole recovery script, on every pass: now the set is kept apart."""
    big = 2**62
    zombie, other = (make_process(start_heartbeat=False, heartbeat_interval=3600) for _ in range(2))
    update, taken = take_a_set(zombie, other, db, big // 2)
    late = Counter(
        other, "x", database=f"sqlite:///{db}", collection="t", spec={"k": "x"}, doc={"c": big}
    )
    third = make_process(start_heartbeat=False, heartbeat_interval=3600)
    Counter(third, "x", database=f"sqlite:///{db}", collection="t", spec={"k": "x"}, doc={"c": 1})
    assert release_many(
        other, [Release(late.resource, "end", "sums", late.recipe(), late.payload())]
    ) == [None]
    survivor = stranger(make_process)
    declared_dead(zombie, survivor)
    assert recovery.recover(survivor) == 1
    keys = zombie.keys.resource(update.resource)
    assert client.hgetall(taken.exec_keys[0]) == {"c": str(big)}
    assert client.hgetall(keys.partials) == {"c": str(big)}
    assert client.smembers(zombie.keys.stranded) == {taken.exec_keys[0]}
