"""Shared by the fields tests: a recording FieldsUpdate, a route using every strategy,
and an independent computation of what that route must produce.

``expected`` is written from the strategies' definitions (docs/aggregation.md),
not from phonon_cli.fields.strategies, so that a wrong merge rule cannot agree with itself.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

import orjson

from phonon_cli.fields import FieldsUpdate

FIELDS: dict[str, dict[str, Any]] = {
    "revenue": {"value": "{amount}", "merge": "sum"},
    "events": {"merge": "count"},
    "low": {"value": "{amount}", "merge": "min"},
    "high": {"value": "{amount}", "merge": "max"},
    "entry": {"value": "{page}", "merge": "first", "by": "{ts}"},
    "exit": {"value": "{page}", "merge": "last", "by": "{ts}"},
    "pages": {"value": "{page}", "merge": "set"},
    "trail": {"value": "{page}", "merge": "list", "n": 3, "by": "{ts}"},
    "history": {"value": "{page}", "merge": "list", "by": "{ts}"},
    "biggest": {"value": "{page}", "merge": "top", "n": 2, "score": "{amount}"},
    "visitors": {"value": "{visitor}", "merge": "distinct_count"},
    "avg": {"value": "{amount}", "merge": "mean"},
}
"""Every strategy; the ordered ones by event time, so the result is order-free."""


def fields_toml(fields: dict[str, dict[str, Any]] = FIELDS) -> str:
    """The ``fields.NAME = { ... }`` lines of a TOML route."""
    lines = []
    for name, spec in fields.items():
        body = ", ".join(f"{k} = {orjson.dumps(v).decode()}" for k, v in spec.items())
        lines.append(f"fields.{name} = {{ {body} }}")
    return "\n".join(lines) + "\n"


def canonical(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def expected(events: list[dict[str, Any]], key: str = "user") -> dict[Any, dict[str, Any]]:
    """What FIELDS must give per key, computed directly from all the events.

    Ties (same time, same score) go to the smaller JSON text for first and in
    lists and top, to the larger for last: the documented tie rule.
    ``visitors`` is the exact distinct count (the sink's is an estimate).
    Nulls follow SQL: ``amount``, ``visitor`` and a null ``page`` in sets and
    tops are skipped (None when every value was null), a null ``page`` is a
    value for first, last and list, and ``events`` counts every event.
    """
    by_key: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_key[e[key]].append(e)
    out = {}
    for k, evs in by_key.items():
        amounts = [e["amount"] for e in evs if e["amount"] is not None]
        timed = sorted((e["ts"], canonical(e["page"])) for e in evs)
        ranked = sorted(
            (-e["amount"], canonical(e["page"]))
            for e in evs
            if e["amount"] is not None and e["page"] is not None
        )
        pages = {canonical(e["page"]) for e in evs if e["page"] is not None}
        visitors = {canonical(e["visitor"]) for e in evs if e["visitor"] is not None}
        out[k] = {
            "revenue": sum(amounts) if amounts else None,
            "events": len(evs),
            "low": min(amounts, default=None),
            "high": max(amounts, default=None),
            "entry": orjson.loads(timed[0][1]),
            "exit": orjson.loads(timed[-1][1]),
            "pages": [orjson.loads(t) for t in sorted(pages)] if pages else None,
            "trail": [orjson.loads(t) for _, t in timed[-3:]],
            "history": [orjson.loads(t) for _, t in timed],
            "biggest": [[-s, orjson.loads(t)] for s, t in ranked[:2]] if ranked else None,
            "visitors": len(visitors) if visitors else None,
            "avg": sum(amounts) / len(amounts) if amounts else None,
        }
    return out


class Recorder(FieldsUpdate):
    """Records the slots of every execution: (resource, doc)."""

    executed: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def execute(self) -> None:
        Recorder.executed.append((self.resource, dict(self.doc)))
