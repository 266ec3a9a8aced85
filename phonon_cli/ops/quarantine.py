"""``phonon quarantine``: the aggregates that could never be written, read and handled.

A key whose write failed for a reason retrying cannot fix (a column the database
refuses, a sum past int64, a null primary key left by an older version) is set
aside by the worker that tried, in the resource's quarantine list
(``core/quarantine.py``), with its recipe, its partial and the error. Nothing of
it is lost and nothing blocks the other keys. From here an operator can:

- ``list`` them (resource, records, age, last error) and ``show`` one whole;
- ``export`` them as JSON lines (the partial as it was deposited, the error), to
  repair elsewhere;
- ``retry`` them: each goes back as the resource's cached partial, for the next
  holder, a survivor or ``flush -c`` to execute (``-c CONFIG`` does it at once);
- ``drop`` them, by glob and only with ``--yes``: the one way to lose data here.

Like ``status``, reading registers no process and walks keys with ``SCAN``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
import redis

from ..clock import Clock, now_ms
from ..store import scripts
from ..store.keys import Keys

SCAN_PAGE = 1000
"""Keys asked for per SCAN call; each page's records are read in one pipeline."""


@dataclass
class Record:
    """One aggregate set aside: what rebuilds it, its partial, and why it failed."""

    resource: str
    kind: str
    recipe: str
    payload: str
    error: str
    at_ms: int | None
    process: str | None
    text: str = field(default="", repr=False)
    """The record as stored (what ``retry`` names to hold one back)."""

    @classmethod
    def parse(cls, resource: str, text: str) -> Record:
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError:
            raw = {"error": f"unreadable record: {text[:80]!r}"}
        get = raw.get if isinstance(raw, dict) else {}.get
        return cls(
            resource,
            str(get("kind") or ""),
            str(get("recipe") or ""),
            str(get("payload") or ""),
            str(get("error") or ""),
            get("at_ms"),
            get("process"),
            text,
        )

    def inexact(self) -> str | None:
        """Why its partial cannot go back as it is, or None when it can.

        A JSON partial is read back with orjson, which holds an integer past 64 bits
        only as a float: a number a custom ``merge`` pushed past int64 (kept whole in
        the record, ``core.quarantine.safe_payload``) would come back rounded, and be
        written so. Sums are checked by the script that puts them back.
        """
        if self.kind != "json":
            return None
        try:
            value = json.loads(self.payload)
        except ValueError:
            return "its partial is not JSON"
        bad = _not_exact(value)
        if bad is None:
            return None
        return (
            f"its partial holds {bad}, which no partial holds exactly (JSON partials are "
            "read as int64 and finite floats; it would come back as a float): fix the "
            "record (phonon quarantine export) or drop it"
        )

    @property
    def update_class(self) -> str | None:
        """The Update class its recipe names (read as data, never imported)."""
        try:
            cls = orjson.loads(self.recipe or "{}").get("cls")
        except (orjson.JSONDecodeError, AttributeError):
            return None
        return cls if isinstance(cls, str) else None

    def to_json(self) -> dict[str, Any]:
        """As exported: the recipe parsed (it names the database without its password)."""
        try:
            recipe: Any = orjson.loads(self.recipe) if self.recipe else None
        except orjson.JSONDecodeError:
            recipe = self.recipe
        return {
            "resource": self.resource,
            "kind": self.kind,
            "recipe": recipe,
            "payload": self.payload,
            "error": self.error,
            "at_ms": self.at_ms,
            "process": self.process,
        }


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _not_exact(value: Any) -> str | None:
    """The first number in ``value`` a partial cannot hold exactly (an integer past
    int64, a float that is not finite), as text; None if there is none."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if INT64_MIN <= value <= INT64_MAX else str(value)
    if isinstance(value, float):
        return None if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            bad = _not_exact(item)
            if bad is not None:
                return bad
    return None


@dataclass
class Quarantined:
    """One resource's quarantine: its records, newest last."""

    resource: str
    records: list[Record] = field(default_factory=list)

    @property
    def last(self) -> Record:
        return self.records[-1]

    def summary(self, now: int) -> dict[str, Any]:
        """What ``status`` and ``quarantine list`` show of it (JSON-ready)."""
        last = self.last
        return {
            "resource": self.resource,
            "records": len(self.records),
            "class": last.update_class,
            "error": last.error,
            "at_ms": last.at_ms,
            "age_s": None if last.at_ms is None else round(max(0, now - last.at_ms) / 1000, 3),
        }


def scan(
    client: redis.Redis, keys: Keys, match: Callable[[str], bool] | None = None
) -> Iterator[Quarantined]:
    """Every quarantined resource (that ``match`` accepts), a SCAN page at a time."""
    page: list[str] = []
    for key in client.scan_iter(match=keys.resource_pattern("quarantine"), count=SCAN_PAGE):
        resource = keys.resource_of(key)
        if resource is not None and (match is None or match(resource)):
            page.append(resource)
        if len(page) >= SCAN_PAGE:
            yield from _read(client, keys, page)
            page = []
    if page:
        yield from _read(client, keys, page)


def count(client: redis.Redis, keys: Keys) -> int:
    """How many resources hold quarantined aggregates: one SCAN of the namespace,
    reading none of them."""
    pattern = keys.resource_pattern("quarantine")
    found = client.scan_iter(match=pattern, count=SCAN_PAGE)
    return sum(1 for key in found if keys.resource_of(key) is not None)


def _read(client: redis.Redis, keys: Keys, resources: list[str]) -> Iterator[Quarantined]:
    pipe = client.pipeline(transaction=False)
    for resource in resources:
        pipe.lrange(keys.resource(resource).quarantine, 0, -1)
    for resource, texts in zip(resources, pipe.execute()):
        if texts:  # retried or dropped between the SCAN and this read
            yield Quarantined(resource, [Record.parse(resource, t) for t in texts])


def show(client: redis.Redis, keys: Keys, resource: str) -> Quarantined | None:
    """One resource's quarantine, or None when it has none."""
    return next(_read(client, keys, [resource]), None)


def export(
    client: redis.Redis, keys: Keys, out: IO[str], match: Callable[[str], bool] | None = None
) -> int:
    """Write every record as one JSON line; returns how many."""
    n = 0
    for q in scan(client, keys, match):
        for record in q.records:
            out.write(orjson.dumps(record.to_json()).decode() + "\n")
            n += 1
    return n


@dataclass
class Retried:
    resources: list[str] = field(default_factory=list)
    """Resources whose records went back (all or some) as cached partials."""
    moved: int = 0
    kept: dict[str, str] = field(default_factory=dict)
    """Resource -> why some of its records still cannot go back (a sum past int64)."""


def retry(
    client: redis.Redis,
    keys: Keys,
    match: Callable[[str], bool] | None = None,
    clock: Clock = now_ms,
) -> Retried:
    """Put quarantined aggregates back as their resources' cached partials, each in
    one script (no record is both back and still quarantined, nor in neither).

    A record whose partial would not come back exact (``Record.inexact``) is held
    back, named in ``kept`` with why; so is one the script finds Redis cannot sum.
    """
    result = Retried()
    for q in list(scan(client, keys, match)):
        rk = keys.resource(q.resource)
        held = {r.text: why for r in q.records if (why := r.inexact()) is not None}
        moved, kept, reason = scripts.UNQUARANTINE(
            keys=[rk.meta, rk.partials, rk.quarantine], args=[clock(), *held], client=client
        )
        if moved:
            result.resources.append(q.resource)
            result.moved += int(moved)
        if kept:
            result.kept[q.resource] = str(reason) or next(iter(held.values()), "")
    return result


def drop(client: redis.Redis, keys: Keys, match: Callable[[str], bool]) -> tuple[int, int]:
    """Delete the quarantines ``match`` accepts: the aggregates are gone for good.
    Returns (resources, records)."""
    resources = records = 0
    for q in list(scan(client, keys, match)):
        if client.delete(keys.resource(q.resource).quarantine):
            resources += 1
            records += len(q.records)
    return resources, records
