"""Quarantine: aggregates that can never be merged or written, set aside in Redis.

Without it, one key whose write can never succeed (a column the database
refuses, a sum past int64) failed every batch it was in: cached back after its
retries, taken again by the next holder, failed again, and the run exited 1,
while the healthy keys of its batch waited with it. Now:

- a batch whose write fails as a whole is split in halves until the keys that
  fail are alone (``isolate``), so every healthy key commits;
- an error is either transient (the database is down or locked: retrying later
  can succeed; the aggregate is cached back and stays in Redis) or permanent
  (anything else, after its retries: retrying cannot help);
- a permanent failure moves the aggregate, with its recipe and the error, to the
  resource's quarantine list, in the same script that forgets the partials it
  was taken from, so it is never lost and never in two places.

``phonon quarantine`` (``ops/quarantine.py``) lists, exports, retries and drops them.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import redis

from .. import defaults, telemetry
from ..exceptions import SerializationError
from ..store import scripts

if TYPE_CHECKING:
    from redis.client import Pipeline

    from .process import Process
    from .update import Failures, Update

log = logging.getLogger(__name__)


@dataclass
class Poisoned:
    """One aggregate to set aside: what rebuilds it, its partial as deposited, and why."""

    resource: str
    kind: str
    recipe: str
    payload: str
    error: str
    exec_keys: tuple[str, str]
    """The partials it was taken from, deleted in the same step (or keys that do not exist)."""


def quarantine(process: Process, items: Sequence[Poisoned]) -> None:
    """Move aggregates to their resources' quarantine lists: one round trip.

    Raises:
        Fenced: this process was declared dead; nothing was moved (the survivor
            that adopts its sets will find them failing, and quarantine them).
    """
    if not items:
        return
    now = process.clock()

    def build(pipe: Pipeline) -> None:
        for start in range(0, len(items), defaults.BATCH_MAX_KEYS):
            keys: list[str] = [process.keys.processes]
            args: list[Any] = [process.id]
            for item in items[start : start + defaults.BATCH_MAX_KEYS]:
                rk = process.keys.resource(item.resource)
                keys += [rk.nodes, rk.meta, rk.partials, rk.quarantine, *item.exec_keys]
                record = {
                    "kind": item.kind,
                    "recipe": item.recipe,
                    "payload": item.payload,
                    "error": item.error,
                    "at_ms": now,
                    "process": process.id,
                }
                args.append(orjson.dumps(record).decode())
            scripts.queue(pipe, scripts.QUARANTINE, keys, args)

    scripts.run(process.client, build, op="quarantine")
    for item in items:
        log.error("%s: quarantined (%s); see 'phonon quarantine list'", item.resource, item.error)
    process.stats["keys_quarantined"] = process.stats.get("keys_quarantined", 0) + len(items)


# -- what is worth retrying ---------------------------------------------------------------

_TRANSIENT_SQLITE = ("locked", "busy", "unable to open", "disk i/o", "database or disk is full")
_TRANSIENT_SQLSTATE = ("08", "40", "53", "55P03", "57", "58")
"""PostgreSQL error classes retrying can fix: connection, rollback (deadlock,
serialization), resources, lock not available, operator intervention, system."""


def is_transient(error: BaseException) -> bool:
    """True when retrying later may succeed: the store or database is unreachable,
    locked, busy or restarting (any ``OSError`` counts: a socket, a full disk, a
    file not there yet). Anything else is the aggregate's own fault.

    The chain of causes is followed (sinks wrap driver errors in ``SinkError``).
    """
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (OSError, redis.ConnectionError, redis.TimeoutError)):
            return True
        if isinstance(e, sqlite3.OperationalError):
            return any(t in str(e).lower() for t in _TRANSIENT_SQLITE)
        sqlstate = getattr(e, "sqlstate", "")
        if type(e).__module__.startswith("psycopg"):
            if not sqlstate:  # no server answer: the connection itself failed
                return type(e).__name__ in ("OperationalError", "InterfaceError")
            return str(sqlstate).startswith(_TRANSIENT_SQLSTATE)
        e = e.__cause__ or e.__context__
    return False


def isolate(cls: type[Update], updates: list[Update]) -> Failures:
    """Execute ``updates``; where several fail with one error (their transaction
    failed as a whole), split them in halves and try again, down to single keys,
    so that one poison aggregate fails alone and every healthy one is written.

    Transient errors are not split: the database being down fails every half too.
    """
    started = time.perf_counter()
    try:
        failures = cls.execute_many(updates)
    except Exception as e:  # noqa: BLE001 - the batch failed as a whole
        failures = [(u, e) for u in updates]
    telemetry.SINK_WRITE_SECONDS.labels(telemetry.sink_name(cls)).observe(
        time.perf_counter() - started
    )
    together: dict[int, list[Update]] = defaultdict(list)
    errors: dict[int, BaseException] = {}
    for u, err in failures:
        together[id(err)].append(u)
        errors[id(err)] = err
    out: Failures = []
    for key, group in together.items():
        error = errors[key]
        if len(group) < 2 or cls.is_transient(error):
            out += [(u, error) for u in group]
            continue
        mid = len(group) // 2
        out += isolate(cls, group[:mid])
        out += isolate(cls, group[mid:])
    return out


def poisoned(update: Update, error: BaseException, exec_keys: tuple[str, str]) -> Poisoned:
    return Poisoned(
        update.resource, update.kind, update.recipe(), safe_payload(update), str(error), exec_keys
    )


def safe_payload(update: Update) -> str:
    """The partial as it is deposited or, when it cannot be (a custom ``merge`` made
    a number past int64, which orjson refuses), its state in plain JSON, which
    Python writes at any size: kept for ``phonon quarantine show`` and ``export``."""
    try:
        return update.payload()
    except SerializationError:
        return json.dumps(update.to_dict(), default=repr)
