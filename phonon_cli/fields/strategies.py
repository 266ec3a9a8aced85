"""Per-field merge strategies: how values of one field combine, locally and in Redis.

An ``Aggregate`` keeps one *slot* per field, named ``<op>[/<n>]:<field>``. The
name says how the slot merges, so a partial in Redis is self-describing: the
Lua ``merge_field`` (scripts.py) merges a deposit into what is cached with no
lock, and a survivor needs no config to merge what a dead worker left. The
Python merge below and the Lua one implement the same rules, and every rule is
commutative and associative, so the aggregate does not depend on the order of
events or on how they were split among workers:

==============  =========  ============================================  ===============
strategy        op         slot value (local / in Redis)                 executed as
==============  =========  ============================================  ===============
sum             sum        number / its repr                             number
count           cnt        int / its repr                                int
min, max        min, max   number / its repr                             number
first, last     first,     (time, json) / "time json"; earliest/latest   the value
                last       time wins, ties by the JSON text
set             set        set of JSON texts / sorted JSON array         sorted values
list (cap n)    list/n     [(time, json)] / JSON array, newest n kept    values, oldest first
top n           top/n      [(score, json)] / JSON array, n largest kept  [[score, value]]
distinct_count  hll        1024 HyperLogLog registers / hex              estimate (int)
mean            msum,mcnt  the sum and the count                         sum / count
==============  =========  ============================================  ===============
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from ..core.update import Update
from ..exceptions import EventError, SerializationError

if TYPE_CHECKING:
    from ..core.process import Process

STRATEGIES = (
    "sum",
    "count",
    "min",
    "max",
    "first",
    "last",
    "set",
    "list",
    "top",
    "distinct_count",
    "mean",
)
NUMERIC = ("sum", "min", "max", "mean")
HLL_BITS = 10
"""log2 of the HyperLogLog register count: 1024 registers, ~3% standard error."""
HLL_REGISTERS = 1 << HLL_BITS


@dataclass(frozen=True)
class Field:
    """One declared field: its name, strategy and the strategy's parameter.

    ``n`` is the cap of ``list`` (0: none) and of ``top`` (required).
    """

    name: str
    merge: str
    n: int = 0

    def slots(self) -> tuple[str, ...]:
        op = {"count": "cnt", "distinct_count": "hll"}.get(self.merge, self.merge)
        if self.merge == "mean":
            return (f"msum:{self.name}", f"mcnt:{self.name}")
        if self.merge in ("list", "top"):
            return (f"{op}/{self.n}:{self.name}",)
        return (f"{op}:{self.name}",)

    def start(self, value: Any, key: Any = None) -> dict[str, Any]:
        """The slots of one event's value. ``key`` is its time (first, last, list)
        or score (top).

        Raises:
            EventError: the value (or key) has the wrong type for the strategy.
        """
        m = self.merge
        if m in NUMERIC or m in ("first", "last", "list", "top"):
            if m in NUMERIC:
                _number(self.name, value)
            if m in ("first", "last", "list", "top"):
                key = _number(f"{self.name} {'score' if m == 'top' else 'time'}", key)
        slot = self.slots()
        if m == "sum" or m == "min" or m == "max":
            return {slot[0]: value}
        if m == "count":
            return {slot[0]: 1}
        if m == "mean":
            return {slot[0]: value, slot[1]: 1}
        text = _json(value)
        if m in ("first", "last"):
            return {slot[0]: (key, text)}
        if m in ("list", "top"):
            return {slot[0]: [(key, text)]}
        if m == "set":
            return {slot[0]: {text}}
        registers = bytearray(HLL_REGISTERS)
        hll_add(registers, text)
        return {slot[0]: registers}

    def result(self, slots: dict[str, Any]) -> Any:
        """The executed value of this field, from its slots (None if never set)."""
        names = self.slots()
        if names[0] not in slots:
            return None
        v = slots[names[0]]
        m = self.merge
        if m == "mean":
            count = slots.get(names[1], 0)
            return v / count if count else None
        if m in ("first", "last"):
            return orjson.loads(v[1])
        if m == "set":
            return [orjson.loads(t) for t in sorted(v)]
        if m == "list":
            return [orjson.loads(t) for _, t in _ordered(v, "list", self.n)]
        if m == "top":
            return [[k, orjson.loads(t)] for k, t in _ordered(v, "top", self.n)]
        if m == "distinct_count":
            return hll_estimate(v)
        return v


def merge_slot(slot: str, a: Any, b: Any) -> Any:
    """The merge of two values of one slot: the same rules as the Lua merge_field."""
    op, n = _op(slot)
    if op in ("sum", "cnt", "msum", "mcnt"):
        return a + b
    if op == "min":
        return b if b < a else a
    if op == "max":
        return b if b > a else a
    if op == "first":
        return min(a, b)
    if op == "last":
        return max(a, b)
    if op == "set":
        return a | b
    if op in ("list", "top"):
        return _ordered([*a, *b], op, n)
    if op == "hll":
        return bytearray(max(x, y) for x, y in zip(a, b))
    raise SerializationError(f"unknown slot {slot!r}")


def encode_slot(slot: str, value: Any) -> str:
    """A slot's value as deposited in Redis (no tab or newline, as RELEASE requires)."""
    op, n = _op(slot)
    if op in ("sum", "cnt", "msum", "mcnt", "min", "max"):
        return repr(value)
    if op in ("first", "last"):
        return f"{value[0]!r} {value[1]}"
    if op == "set":
        return orjson.dumps(sorted(value)).decode()
    if op in ("list", "top"):
        return orjson.dumps([[repr(k), t] for k, t in _ordered(value, op, n)]).decode()
    if op == "hll":
        return bytes(value).hex()
    raise SerializationError(f"unknown slot {slot!r}")


def decode_slot(slot: str, text: str) -> Any:
    """A slot's value from Redis."""
    op, _ = _op(slot)
    if op in ("sum", "cnt", "msum", "mcnt", "min", "max"):
        return _parse_number(text)
    if op in ("first", "last"):
        key, _, value = text.partition(" ")
        return (_parse_number(key), value)
    if op == "hll":  # hex, not JSON: checked before the JSON parse below
        return bytearray.fromhex(text)
    items = orjson.loads(text)
    if op == "set":
        return set(items) if isinstance(items, list) else set()
    if op in ("list", "top"):
        return [(_parse_number(k), t) for k, t in items] if isinstance(items, list) else []
    raise SerializationError(f"unknown slot {slot!r}")


class Aggregate(Update):
    """An update whose ``doc`` holds merge slots (see the module docstring).

    Partials merge inside Redis field by field, so no step takes a lock and an
    eviction stays one round trip. ``fields`` (the declared fields, in order)
    come from the route; a survivor that rebuilds a partial without them still
    merges it correctly, since each slot's name says how.
    """

    kind: ClassVar[str] = "fields"

    def __init__(
        self, process: Process, _id: Any, *args: Any, fields: Sequence[Field] = (), **kwargs: Any
    ) -> None:
        super().__init__(process, _id, *args, **kwargs)
        self.fields = tuple(fields)

    def merge(self, other: Update) -> None:
        self.merge_slots(other.doc)

    def merge_slots(self, slots: dict[str, Any]) -> None:
        """Merge one event's slots (the run loop's path: no Update built per event)."""
        doc = self.doc
        for slot, value in slots.items():
            doc[slot] = merge_slot(slot, doc[slot], value) if slot in doc else value

    def payload(self) -> str:
        return "".join(f"{slot}\t{encode_slot(slot, v)}\n" for slot, v in self.doc.items())

    def absorb(self, kind: str, items: Sequence[str]) -> None:
        if kind == "json":
            return super().absorb(kind, items)
        doc = self.doc
        for slot, text in zip(items[::2], items[1::2]):
            value = decode_slot(slot, text)
            doc[slot] = merge_slot(slot, doc[slot], value) if slot in doc else value

    def values(self) -> dict[str, Any]:
        """Field name -> executed value, for the declared fields (or every slot's field)."""
        fields = self.fields or fields_of(self.doc)
        return {f.name: f.result(self.doc) for f in fields}


def fields_of(doc: dict[str, Any]) -> tuple[Field, ...]:
    """The fields whose slots ``doc`` holds (for a partial rebuilt without its route)."""
    ops = {"cnt": "count", "hll": "distinct_count", "msum": "mean"}
    seen: dict[str, Field] = {}
    for slot in doc:
        op, n = _op(slot)
        name = slot.partition(":")[2]
        if op != "mcnt" and name not in seen:
            seen[name] = Field(name, ops.get(op, op), n)
    return tuple(seen.values())


def hll_add(registers: bytearray, text: str) -> None:
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    index = h >> (64 - HLL_BITS)
    rest = h & ((1 << (64 - HLL_BITS)) - 1)
    rank = (64 - HLL_BITS) - rest.bit_length() + 1
    if rank > registers[index]:
        registers[index] = rank


def hll_estimate(registers: bytes | bytearray) -> int:
    m = len(registers)
    alpha = 0.7213 / (1 + 1.079 / m)
    estimate = alpha * m * m / sum(2.0**-r for r in registers)
    zeros = registers.count(0)
    if estimate <= 2.5 * m and zeros:
        estimate = m * math.log(m / zeros)  # small range: linear counting
    return round(estimate)


def _op(slot: str) -> tuple[str, int]:
    head = slot.partition(":")[0]
    op, _, n = head.partition("/")
    return op, int(n or 0)


def _ordered(items: list[tuple[Any, str]], op: str, n: int) -> list[tuple[Any, str]]:
    if op == "list":
        items = sorted(items)
        return items[-n:] if n else items
    items = sorted(items, key=lambda kt: (-kt[0], kt[1]))
    return items[:n] if n else items


def _number(what: str, value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EventError(f"{what} is not a number: {value!r}")
    return value


def _parse_number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
