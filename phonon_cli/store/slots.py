"""A batched script call on Redis Cluster: split by hash slot, sent per node, put back.

A batched script (``scripts.ACQUIRE``, ``RELEASE``, ``RECOVER``) covers many
resources in one call. A cluster runs a script only if all its keys hash to one
slot, and the keys of one resource do (they share a hash tag), so a batch becomes
one call per slot, each with its resources' keys and arguments and the batch's
shared leading arguments. The cluster pipeline writes every node its share
before reading any reply, so a batch costs one round trip per node, taken
together, however many keys it has. ``run`` then puts the replies back in the
order the caller queued them: callers never know which store they talk to.

The process's own keys (registry and held set) are in another slot than the
resources, so the per-slot calls leave them out, and ``FENCE_HELD`` does their part:
before the batch, the fence check and the resources that enter the held set;
after it, those that leave. Fencing is then checked just before the batch rather
than in the same atomic step: see docs/scaling.md for what that changes. Each
per-slot call keeps its reply in a replies hash of its own slot
(``Keys.slot_replies``), so a call sent again after its reply was lost is answered
from there and applies nothing twice, as on one server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.commands.core import Script
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, NoScriptError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import defaults
from .keys import in_slot

log = logging.getLogger(__name__)

Held = Callable[[Sequence[Any]], "tuple[str, str] | None"]


@dataclass(frozen=True)
class Layout:
    """How a batched script lays out its KEYS and ARGV."""

    head_keys: int
    """The process's own keys before the resources' (registry, held set), or 0."""
    item_keys: int
    """KEYS per resource."""
    item_args: int
    """ARGV per resource; those before them are shared by the whole batch."""
    held: Held | None = None
    """From one resource's ARGV: ("+" or "-", resource) for the held set, or None."""
    marks: Callable[[Sequence[Any]], str] | None = None
    """From one resource's ARGV: the source marks its release records (``FENCE_HELD``
    raises the partitions' highest marks from them before the batch)."""
    replies: bool = False
    """The last of the head keys is the caller's replies template (``Keys.slot_replies``):
    each per-slot call gets, as its only leading key, the replies hash of its slot, so
    the call is recognised if it is sent again after its reply was lost."""


def load(client: Any, scripts: Sequence[Script]) -> None:
    """SCRIPT LOAD on every node of the cluster (replicas too, so a promoted one has
    them; a replica that cannot take them now gets them after a NOSCRIPT)."""
    for node in client.get_nodes():
        conn = client.get_redis_connection(node)
        for script in scripts:
            try:
                conn.script_load(script.script)
            except Exception:
                if node.server_type == "primary":
                    raise


@dataclass
class _Split:
    """One batched call queued as one call per slot."""

    position: int
    """Index in the pipeline of the first per-slot call."""
    count: int
    """Resources in the batch."""
    groups: list[list[int]] = field(default_factory=list)
    """Per slot call, the indexes of its resources in the batch."""
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    """Per slot call, its EVALSHA arguments (to send again after NOSCRIPT)."""
    head: list[str] = field(default_factory=list)
    """The process's own keys the per-slot calls leave out."""
    pid: str = ""
    entering: list[str] = field(default_factory=list)
    leaving: list[str] = field(default_factory=list)
    marks: list[str] = field(default_factory=list)


def queue(
    pipe: Any, script: Script, keys: Sequence[str], args: Sequence[Any], layout: Layout | None
) -> None:
    """Queue one EVALSHA per hash slot that ``keys`` reach (see the module docstring)."""
    if layout is None:  # not batched: one call, its keys in one slot
        layout = Layout(0, len(keys), 0)
    head, per_keys, per_args = layout.head_keys, layout.item_keys, layout.item_args
    count = (len(keys) - head) // per_keys if per_keys else 0
    shared = list(args[: len(args) - count * per_args])
    fence = head - 1 if layout.replies else head
    split = _Split(position=len(pipe), count=count, head=list(keys[:fence]))
    by_slot: dict[int, list[int]] = {}
    for i in range(count):
        by_slot.setdefault(key_slot(keys[head + i * per_keys].encode()), []).append(i)
        if layout.held is not None:
            first = len(shared) + i * per_args
            held = layout.held(args[first : first + per_args])
            if held is not None:
                (split.entering if held[0] == "+" else split.leaving).append(held[1])
            if layout.marks is not None:
                split.marks.append(layout.marks(args[first : first + per_args]))
    if head:
        split.pid = str(args[0])
    for slot, items in by_slot.items():
        k = [keys[head + i * per_keys + j] for i in items for j in range(per_keys)]
        if layout.replies:
            k.insert(0, in_slot(keys[head - 1], slot))
        first = len(shared)
        a = shared + [args[first + i * per_args + j] for i in items for j in range(per_args)]
        call = (script.sha, len(k), *k, *a)
        # Not pipe.evalsha: redis-py blocks it on a cluster pipeline. And the node is
        # named here: left to find the keys itself, redis-py asks the server (COMMAND
        # GETKEYS), one round trip per call. A stale slot table costs a MOVED, which
        # the pipeline follows.
        node = pipe.nodes_manager.get_node_from_slot(slot)
        pipe.execute_command("EVALSHA", *call, target_nodes=node)
        split.groups.append(items)
        split.calls.append(call)
    splits = getattr(pipe, "phonon_splits", None)
    if splits is None:
        splits = []
        setattr(pipe, "phonon_splits", splits)  # noqa: B010 - a pipeline has no slot for it
    splits.append(split)


def run(
    client: Any, build: Callable[[Any], None], scripts: Sequence[Script], fence_held: Script
) -> list[Any]:
    """Execute the pipeline ``build`` fills, as ``scripts.run`` does on one server.

    Raises:
        ResponseError: the first error any call answered (a fenced process's among them).
    """
    replies, splits = _send(client, build)
    fenced = [s for s in splits if s.head]
    if fenced:  # the fence first: a fenced process applies nothing
        # registry, then (for ACQUIRE/RELEASE, not QUARANTINE) the held set
        # (and, for RELEASE, the highest marks)
        head, pid = max((s.head for s in fenced), key=len), fenced[0].pid
        entering = [r for s in fenced for r in s.entering]
        marks = "".join(m for s in fenced for m in s.marks)
        _execute(client, scripts, fence_held, head, [pid, "+", marks, *entering])
    results = _reassemble(client, scripts, replies(), splits)
    # Only what is left in the end: a key released and taken again in the same
    # batch (release first, then acquire) is held, and must stay in the held set,
    # or a death would leave it on a nodelist that recovery never visits.
    last: dict[str, bool] = {}
    for s in fenced:  # in the pipeline's order
        last.update(dict.fromkeys(s.entering, True))
        last.update(dict.fromkeys(s.leaving, False))
    leaving = [r for r, held in last.items() if not held]
    if leaving:  # only once they are left: recovery visits what the held set names
        _execute(client, scripts, fence_held, head, [pid, "-", "", *leaving])
    return results


def _execute(
    client: Any, scripts: Sequence[Script], script: Script, keys: list[str], args: list[Any]
) -> Any:
    replies, splits = _send(client, lambda pipe: queue(pipe, script, keys, args, None))
    return _reassemble(client, scripts, replies(), splits)[0]


def _send(
    client: Any, build: Callable[[Any], None]
) -> tuple[Callable[[], list[Any]], list[_Split]]:
    """The pipeline ``build`` fills, and a function that sends it once.

    A node that cannot be reached while a replica takes its place fails the
    pipeline before anything is written (redis-py picks every node's connection
    first), and redis-py retries that at once, well before a failover is done:
    so the whole pipeline is sent again, with pauses, for up to
    ``CLUSTER_FAILOVER_WAIT_S``. Replies that are errors (a connection lost after
    writing) are not resent here: redis-py resends those one by one.
    """
    pipe = client.pipeline(transaction=False)
    build(pipe)
    splits: list[_Split] = getattr(pipe, "phonon_splits", [])

    def replies() -> list[Any]:
        nonlocal pipe
        deadline = time.monotonic() + defaults.CLUSTER_FAILOVER_WAIT_S
        pause = 0.1
        while True:
            try:
                return list(pipe.execute(raise_on_error=False))
            except (RedisConnectionError, RedisTimeoutError, ClusterDownError) as e:
                if time.monotonic() + pause > deadline:
                    raise
                log.warning("redis cluster: %s; sending the batch again in %.1fs", e, pause)
                time.sleep(pause)
                pause = min(pause * 2, 2.0)
                pipe = client.pipeline(transaction=False)
                build(pipe)  # execute() emptied the pipeline; the splits are the same

    return replies, splits


def _reassemble(
    client: Any, scripts: Sequence[Script], results: list[Any], splits: list[_Split]
) -> list[Any]:
    """The replies as the caller queued them: one per batched call, its per-resource
    answers in the batch's order.

    A node without our scripts (a replica just promoted, a node added by a
    reshard) answered NOSCRIPT and ran nothing: the scripts are loaded on every
    node and only those calls are sent again. Any other error is raised.
    """
    for split in splits:
        for n, call in enumerate(split.calls):
            if isinstance(results[split.position + n], NoScriptError):
                load(client, scripts)
                results[split.position + n] = client.evalsha(*call)
    for result in results:
        if isinstance(result, Exception):
            raise result
    for split in reversed(splits):
        end = split.position + len(split.groups)
        if split.count == 1 and not split.head and len(split.groups) == 1:
            continue  # not batched: the reply as it is
        merged: list[Any] = [None] * split.count
        for items, reply in zip(split.groups, results[split.position : end]):
            if isinstance(reply, (str, bytes)):  # a JSON array (ACQUIRE, RELEASE: answers)
                reply = orjson.loads(reply)
            for i, answer in zip(items, reply):
                merged[i] = answer
        results[split.position : end] = [merged]
    return results
