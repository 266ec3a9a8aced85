"""Per-field merge strategies: one class per strategy, in one registry.

A ``FieldsUpdate`` (aggregate.py) keeps one *slot* per field, named
``<op>[/<n>]:<field>``. The name says how the slot merges, so a partial in Redis
is self-describing: the Lua ``merge_field`` (store/scripts.py) merges a deposit
into what is cached with no lock, and a survivor needs no config to merge what
a dead worker left. Each ``Strategy`` below holds everything one strategy means,
so adding one is adding a class here (and its branch in the Lua, which the
parity test in tests/test_fields.py holds to the Python):

- what an event adds (``item``: code for the route's generated builder);
- the merge of two states (``merger``), and of an event's item into a state
  (``add_code``, for the generated per-event merge: in place, O(1) amortised);
- the text in Redis (``encode``, ``decode``: what the Lua merges);
- the executed value (``result``);
- the SQL columns, and how a row's columns turn back into slots to combine
  with a later session (``columns``, ``dump``, ``load``).

Every rule is commutative and associative, so the aggregate does not depend on
the order of events or on how they were split among workers:

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
distinct_count  hll        texts, or {register: rank} / hex (hll.py)     estimate (int)
mean            msum,mcnt  the sum and the count                         sum / count
==============  =========  ============================================  ===============

Nulls never reach a strategy: routing/fields.py skips them (or dead-letters the
event) before its slots are made, as each strategy's ``skips_nulls`` says.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, ClassVar, Protocol

import orjson

from ..exceptions import EventError, SerializationError
from ..poison import INT64_END, INT64_MIN, short
from . import hll

Slots = dict[str, Any]
Merge = Callable[[Any, Any], Any]
"""``merge(a, b)``: ``a`` combined with ``b``, in place where ``a`` is a container."""


class SqlValues(Protocol):
    """What a strategy needs of a SQL connection (sinks/sqlbase.Connection)."""

    def fold(self, name: str) -> str: ...

    def dump_any(self, value: Any) -> Any: ...

    def load_any(self, value: Any) -> Any: ...

    def load_json(self, value: Any) -> Any: ...


class Strategy:
    """How the values of one field combine. Subclasses are stateless singletons.

    Class attributes describe the strategy to the config checks:

    - ``name``: as written in a config (``merge = "sum"``); ``op``: the slot
      prefix in Redis (the Lua dispatches on it);
    - ``numeric``: the value must be a number;
    - ``options``: which of ``by``, ``score``, ``n`` the field may give;
      ``required``: which it must give; ``needs_value``: ``value`` is required;
    - ``timed``: ordered by a time (``by``, else the arrival clock);
    - ``skips_nulls``: SQL's rule: a null value is skipped (else it is a value).
    """

    name: ClassVar[str]
    op: ClassVar[str]
    numeric: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ()
    required: ClassVar[tuple[str, ...]] = ()
    needs_value: ClassVar[bool] = True
    timed: ClassVar[bool] = False
    skips_nulls: ClassVar[bool] = True
    ops: ClassVar[tuple[str, ...]] = ()
    """Every slot op of the strategy (``op`` and, for mean, its count)."""
    summed: ClassVar[tuple[str, ...]] = ()
    """The slot ops that add up event values, so a merge may leave the 64-bit range
    (a count adds ones: it cannot, within any session)."""

    key_name: ClassVar[str | None] = None
    """What the key of a keyed strategy is called in messages: "time" or "score"."""
    uses_text: ClassVar[bool] = False
    """Its slots hold the value's canonical JSON text (``_json``)."""

    def slot_names(self, name: str, n: int) -> tuple[str, ...]:
        return (f"{self.op}:{name}",)

    def item(self, v: str, k: str, t: str) -> str:
        """The Python expression of what one event adds, for the route's generated
        builder (routing/fields.py): ``v`` names the value (a checked number for a
        ``numeric`` strategy), ``k`` the key (a checked number), ``t`` the value's
        JSON text. Null values never get here where the strategy skips them."""
        raise NotImplementedError

    def add_code(self, slots: tuple[str, ...], n: int) -> list[str]:
        """Python lines adding one event's item ``x`` (never None) into ``doc``, in
        place, for the generated per-event merge (aggregate.py): the same rule as
        ``merger`` applied to the state of one event. The slot may be missing."""
        raise NotImplementedError

    def merger(self, n: int) -> Merge:
        raise NotImplementedError

    def copy(self, state: Any) -> Any:
        """A state no container of which is shared with ``state`` (numbers, tuples: itself)."""
        return state

    def encode(self, state: Any, n: int) -> str:
        """The state as deposited in Redis (no tab or newline, as RELEASE requires)."""
        return repr(state)

    def encoder(self, n: int) -> Callable[[Any], str]:
        """``encode`` with the cap bound: one call per slot as a key leaves (``repr``
        itself for a number: no Python frame)."""
        if type(self).encode is Strategy.encode:
            return repr
        encode = self.encode
        return lambda state: encode(state, n)

    def decode(self, text: str) -> Any:
        return _parse_number(text)

    def number(self, state: Any) -> Any:
        """The number SQL stores as itself (checked to fit 64 bits); None when none."""
        return None

    def result(self, f: Field, slots: Slots) -> Any:
        """The executed value (the slot is present: ``Field.result`` checks)."""
        return slots[f.slots()[0]]

    def columns(self, f: Field, slots: Slots | None) -> list[tuple[str, str]]:
        """``(column, kind)`` of the field; kinds: int, float, json, any, text.
        A number's kind follows the slot's value when there is one."""
        return [(f.name, "json")]

    def dump(self, c: SqlValues, f: Field, slots: Slots) -> list[Any]:
        """The column values, in ``columns`` order."""
        return [_json_text(self.result(f, slots))]

    def load(self, c: SqlValues, f: Field, row: dict[str, Any]) -> Slots:
        """The slots a row's columns hold (``row``: folded column -> value); {} if unset."""
        raise NotImplementedError


def _number_kind(value: Any) -> str:
    return "float" if isinstance(value, float) else "int"


class _Number(Strategy):
    """A number per slot; the SQL column is the number itself."""

    numeric = True

    def item(self, v: str, k: str, t: str) -> str:
        return v

    def number(self, state: Any) -> Any:
        return state

    def columns(self, f: Field, slots: Slots | None) -> list[tuple[str, str]]:
        return [(f.name, _number_kind((slots or {}).get(f.slots()[0])))]

    def dump(self, c: SqlValues, f: Field, slots: Slots) -> list[Any]:
        return [slots[f.slots()[0]]]

    def load(self, c: SqlValues, f: Field, row: dict[str, Any]) -> Slots:
        v = row.get(c.fold(f.name))
        return {} if v is None else {f.slots()[0]: v}


def _counted(slot: str) -> list[str]:
    """Lines adding one to a count slot (dict operators: no method call per event).

    The slot is looked up once, a missing one found by ``KeyError`` (free in
    Python 3.11 when not raised; raised at most once per slot and key): the
    same holds for every ``add_code``."""
    return [f"try: doc[{slot!r}] += 1", f"except KeyError: doc[{slot!r}] = 1"]


def _kept_if(slot: str, op: str) -> list[str]:
    """Lines keeping ``x`` in the slot if the slot is missing or ``x {op} slot``."""
    return [
        "try:",
        f"    if x {op} doc[{slot!r}]: doc[{slot!r}] = x",
        f"except KeyError: doc[{slot!r}] = x",
    ]


def _add(a: Any, b: Any) -> Any:
    return a + b


def _smaller(a: Any, b: Any) -> Any:
    return b if b < a else a


def _larger(a: Any, b: Any) -> Any:
    return b if b > a else a


class Sum(_Number):
    name, op = "sum", "sum"
    summed = ("sum",)

    def add_code(self, slots: tuple[str, ...], n: int) -> list[str]:
        return [f"doc[{slots[0]!r}] = x"]  # x: the sum, checked (aggregate.py)

    def merger(self, n: int) -> Merge:
        return _add


class Count(_Number):
    name, op = "count", "cnt"
    numeric = False
    needs_value = False
    skips_nulls = False  # count counts events

    def item(self, v: str, k: str, t: str) -> str:
        return "1"

    def add_code(self, slots: tuple[str, ...], n: int) -> list[str]:
        return _counted(slots[0])

    def merger(self, n: int) -> Merge:
        return _add

    def columns(self, f: Field, slots: Slots | None) -> list[tuple[str, str]]:
        return [(f.name, "int")]


class Min(_Number):
    name, op = "min", "min"

    def add_code(self, slots: tuple[str, ...], n: int) -> list[str]:
        return _kept_if(slots[0], "<")

    def merger(self, n: int) -> Merge:
        return _smaller


class Max(_Number):
    name, op = "max", "max"

    def add_code(self, slots: tuple[str, ...], n: int) -> list[str]:
        return _kept_if(slots[0], ">")

    def merger(self, n: int) -> Merge:
        return _larger


class Mean(_Number):
    """Two slots, the sum and the count, each merged as a sum."""

    name, op = "mean", "msum"
    ops: ClassVar[tuple[str, ...]] = ("msum", "mcnt")
    summed = ("msum",)

    def add_code(self, slots: tuple[str, ...], n: int) -> list[str]:
        total, count = slots
        return [f"doc[{total!r}] = x", *_counted(count)]  # x: the sum, checked (aggregate.py)

    def slot_names(self, name: str, n: int) -> tuple[str, ...]:
        return (f"msum:{name}", f"mcnt:{name}")

    def merger(self, n: int) -> Merge:
        return _add

    def result(self, f: Field, slots: Slots) -> Any:
        total, count = f.slots()
        return slots[total] / slots[count] if slots.get(count) else None

    def columns(self, f: Field, slots: Slots | None) -> list[tuple[str, str]]:
        v = (slots or {}).get(f.slots()[0])
        return [(f.name, "float"), (f"{f.name}__sum", _number_kind(v)), (f"{f.name}__count", "int")]

    def dump(self, c: SqlValues, f: Field, slots: Slots) -> list[Any]:
        total, count = f.slots()
        return [slots[total] / slots[count], slots[total], slots[count]]

    def load(self, c: SqlValues, f: Field, row: dict[str, Any]) -> Slots:
        total, count = f.slots()
        n = row.get(c.fold(f"{f.name}__count"))
        return {} if n is None else {total: row.get(c.fold(f"{f.name}__sum")), count: n}


class _Timed(Strategy):
    """A value with its time: ``(time, canonical JSON text)``."""

    options: ClassVar[tuple[str, ...]] = ("by",)
    timed = True
    skips_nulls = False  # any JSON value, null included

    def item(self, v: str, k: str, t: str) -> str:
        return f"({k}, {t})"

    key_name = "time"
    uses_text = True

    def encode(self, state: Any, n: int) -> str:
        return f"{state[0]!r} {state[1]}"

    def decode(self, text: str) -> Any:
        key, _, value = text.partition(" ")
        return (_parse_number(key), value)

    def number(self, state: Any) -> Any:
        return state[0]

    def result(self, f: Field, slots: Slots) -> Any:
        return orjson.loads(slots[f.slots()[0]][1])

    def columns(self, f: Field, slots: Slots | None) -> list[tuple[str, str]]:
        v = (slots or {}).get(f.slots()[0])
        return [(f.name, "any"), (f"{f.name}__at", _number_kind(v[0] if v else 0))]

    def dump(self, c: SqlValues, f: Field, slots: Slots) -> list[Any]:
        at, text = slots[f.slots()[0]]
        return [c.dump_any(orjson.loads(text)), at]

    def load(self, c: SqlValues, f: Field, row: dict[str, Any]) -> Slots:
        at = row.get(c.fold(f"{f.name}__at"))
        if at is None:
            return {}
        return {f.slots()[0]: (at, _json(c.load_any(row.get(c.fold(f.name)))))}


class First(_Timed):
    """The earliest time wins; ties: the smaller JSON text (tuples compare so)."""

    name, op = "first", "first"

    def add_code(self, slots: tuple[str, ...], n: int) -> list[str]:
        return _kept_if(slots[0], "<")

    def merger(self, n: int) -> Merge:
        return _smaller


class Last(_Timed):
    """The latest time wins; ties: the larger JSON text."""

    name, op = "last", "last"

    def add_code(self, slots: tuple[str, ...], n: int) -> list[str]:
        return _kept_if(slots[0], ">")

    def merger(self, n: int) -> Merge:
        return _larger


class Set(Strategy):
    name, op = "set", "set"

    def item(self, v: str, k: str, t: str) -> str:
        return t

    def add_code(self, slots: tuple[str, ...], n: int) -> list[str]:
        s = slots[0]
        return [f"try: doc[{s!r}].add(x)", f"except KeyError: doc[{s!r}] = {{x}}"]

    uses_text = True

    def merger(self, n: int) -> Merge:
        def union(a: set[str], b: set[str]) -> set[str]:
            a |= b
            return a

        return union

    def copy(self, state: Any) -> Any:
        return set(state)

    def encode(self, state: Any, n: int) -> str:
        return orjson.dumps(sorted(state)).decode()

    def decode(self, text: str) -> Any:
        items = orjson.loads(text)
        return set(items) if isinstance(items, list) else set()

    def result(self, f: Field, slots: Slots) -> Any:
        return [orjson.loads(t) for t in sorted(slots[f.slots()[0]])]

    def dump(self, c: SqlValues, f: Field, slots: Slots) -> list[Any]:
        # The members are JSON texts already: the array is written, not parsed and dumped.
        return ["[" + ",".join(sorted(slots[f.slots()[0]])) + "]"]

    def load(self, c: SqlValues, f: Field, row: dict[str, Any]) -> Slots:
        v = row.get(c.fold(f.name))
        return {} if v is None else {f.slots()[0]: {_json(x) for x in c.load_json(v)}}


class _Ranked(Strategy):
    """Items ``(key, JSON text)`` kept in a plain list, compacted lazily.

    Appending is O(1); once the list holds twice the cap it is sorted and cut
    back to the cap (``ordered``), so each event costs O(log n) amortised and a
    key never holds more than 2n items. An item cut is never among the kept
    ones later: both caps keep the extremes of a total order.
    """

    def slot_names(self, name: str, n: int) -> tuple[str, ...]:
        return (f"{self.op}/{n}:{name}",)

    def ordered(self, items: list[tuple[Any, str]], n: int) -> list[tuple[Any, str]]:
        """The items kept, in the executed order."""
        raise NotImplementedError

    uses_text = True

    def item(self, v: str, k: str, t: str) -> str:
        return f"({k}, {t})"

    def add_code(self, slots: tuple[str, ...], n: int) -> list[str]:
        s = slots[0]
        lines = [
            f"try: c = doc[{s!r}]",
            f"except KeyError: doc[{s!r}] = [x]",
            "else:",
            "    c.append(x)",
        ]
        if n:  # cut back to the cap once twice over it: sorted in place, as ``ordered``
            lines += [f"    if len(c) > {2 * n}:", *(f"        {cut}" for cut in self.cut_code(n))]
        return lines

    def cut_code(self, n: int) -> list[str]:
        """Lines keeping in ``c`` only the items ``ordered`` keeps (order aside)."""
        raise NotImplementedError

    def merger(self, n: int) -> Merge:
        ordered = self.ordered

        def append(a: list[tuple[Any, str]], b: list[tuple[Any, str]]) -> list[tuple[Any, str]]:
            a += b
            if n and len(a) > 2 * n:
                a[:] = ordered(a, n)
            return a

        return append

    def copy(self, state: Any) -> Any:
        return list(state)

    def encode(self, state: Any, n: int) -> str:
        return orjson.dumps([[repr(k), t] for k, t in self.ordered(state, n)]).decode()

    def decode(self, text: str) -> Any:
        items = orjson.loads(text)
        return [(_parse_number(k), t) for k, t in items] if isinstance(items, list) else []


class List(_Ranked):
    """Every value with its time, oldest first; with ``n``, the newest n."""

    name, op = "list", "list"
    options: ClassVar[tuple[str, ...]] = ("by", "n")
    timed = True
    skips_nulls = False

    key_name = "time"

    def ordered(self, items: list[tuple[Any, str]], n: int) -> list[tuple[Any, str]]:
        items = sorted(items)
        return items[-n:] if n else items

    def cut_code(self, n: int) -> list[str]:
        return ["c.sort()", f"del c[:-{n}]"]

    def result(self, f: Field, slots: Slots) -> Any:
        return [orjson.loads(t) for _, t in self.ordered(slots[f.slots()[0]], f.n)]

    def columns(self, f: Field, slots: Slots | None) -> list[tuple[str, str]]:
        return [(f.name, "json"), (f"{f.name}__at", "json")]

    def dump(self, c: SqlValues, f: Field, slots: Slots) -> list[Any]:
        items = self.ordered(slots[f.slots()[0]], f.n)
        return ["[" + ",".join(t for _, t in items) + "]", _json_text([k for k, _ in items])]

    def load(self, c: SqlValues, f: Field, row: dict[str, Any]) -> Slots:
        v = row.get(c.fold(f.name))
        if v is None:
            return {}
        times = c.load_json(row.get(c.fold(f"{f.name}__at"))) or []
        return {f.slots()[0]: [(k, _json(x)) for k, x in zip(times, c.load_json(v))]}


KEY = operator.itemgetter(0)
TEXT = operator.itemgetter(1)


def by_rank(items: list[tuple[Any, str]]) -> None:
    """Sort ``(score, text)`` items in place, largest score first, ties by the smaller
    text: by text, then by score reversed, which keeps equal scores in text order
    (a stable sort stays stable reversed). Two sorts keyed in C cost less than one
    keyed by a Python function called per item."""
    items.sort(key=TEXT)
    items.sort(key=KEY, reverse=True)


class Top(_Ranked):
    """The n values with the largest score; ties: the smaller JSON text first."""

    name, op = "top", "top"
    options: ClassVar[tuple[str, ...]] = ("score", "n")
    required: ClassVar[tuple[str, ...]] = ("n", "score")

    key_name = "score"

    def ordered(self, items: list[tuple[Any, str]], n: int) -> list[tuple[Any, str]]:
        items = list(items)
        by_rank(items)
        return items[:n] if n else items

    def cut_code(self, n: int) -> list[str]:
        # One sort in C, largest first (equal scores: the larger text first). Which n
        # are kept differs from ``by_rank``'s only for a tie across the cut: then
        # by_rank settles it. The order of the kept items does not matter here.
        return [
            "c.sort(reverse=True)",
            f"if c[{n - 1}][0] == c[{n}][0]: BY_RANK(c)",
            f"del c[{n}:]",
        ]

    def result(self, f: Field, slots: Slots) -> Any:
        return [[k, orjson.loads(t)] for k, t in self.ordered(slots[f.slots()[0]], f.n)]

    def dump(self, c: SqlValues, f: Field, slots: Slots) -> list[Any]:
        items = self.ordered(slots[f.slots()[0]], f.n)
        return ["[" + ",".join(f"[{_json_text(k)},{t}]" for k, t in items) + "]"]

    def load(self, c: SqlValues, f: Field, row: dict[str, Any]) -> Slots:
        v = row.get(c.fold(f.name))
        return {} if v is None else {f.slots()[0]: [(k, _json(x)) for k, x in c.load_json(v)]}


class DistinctCount(Strategy):
    """A HyperLogLog (hll.py): the first values' texts in a set, then registers, one
    updated per event."""

    name, op = "distinct_count", "hll"

    def item(self, v: str, k: str, t: str) -> str:
        return t  # the JSON text: kept, or hashed to its register by add_code

    def add_code(self, slots: tuple[str, ...], n: int) -> list[str]:
        # hll.add written out (no call per event); test_build_makes_every_fields_slots
        # and test_distinct_count_keeps_texts_then_registers hold the two to the same.
        s = slots[0]
        return [
            f"try: c = doc[{s!r}]",
            f"except KeyError: doc[{s!r}] = {{x}}",
            "else:",
            "    if c.__class__ is set:",
            "        c.add(x)",
            f"        if len(c) > {hll.TEXTS_MAX}: doc[{s!r}] = HLL_REGISTERS(c)",
            "    else:",
            "        h = HLL_HASH()",
            "        h.update(x.encode())",
            "        h = FROM_BYTES(h.digest(), 'big')",
            "        hi = h >> 54",
            "        hr = 55 - (h & 0x3FFFFFFFFFFFFF).bit_length()",
            "        if hi not in c or hr > c[hi]: c[hi] = hr",
        ]

    uses_text = True

    def merger(self, n: int) -> Merge:
        return hll.union

    def copy(self, state: Any) -> Any:
        return set(state) if state.__class__ is set else dict(state)

    def encode(self, state: Any, n: int) -> str:
        return hll.encode(hll.registers(state))

    def decode(self, text: str) -> Any:
        return hll.decode(text)

    def result(self, f: Field, slots: Slots) -> Any:
        return hll.estimate(hll.registers(slots[f.slots()[0]]))

    def columns(self, f: Field, slots: Slots | None) -> list[tuple[str, str]]:
        return [(f.name, "int"), (f"{f.name}__hll", "text")]

    def dump(self, c: SqlValues, f: Field, slots: Slots) -> list[Any]:
        registers = hll.registers(slots[f.slots()[0]])
        return [hll.estimate(registers), hll.encode(registers)]

    def load(self, c: SqlValues, f: Field, row: dict[str, Any]) -> Slots:
        registers = row.get(c.fold(f"{f.name}__hll"))
        return {} if registers is None else {f.slots()[0]: hll.decode(registers)}


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Sum(),
        Count(),
        Min(),
        Max(),
        First(),
        Last(),
        Set(),
        List(),
        Top(),
        DistinctCount(),
        Mean(),
    )
}
"""Config name -> strategy, in the order the docs list them."""
BY_OP: dict[str, Strategy] = {op: s for s in STRATEGIES.values() for op in (s.ops or (s.op,))}
"""Slot op (``sum``, ``cnt``, ``msum``, ``mcnt``, ...) -> the strategy that merges it."""


@dataclass(frozen=True)
class Field:
    """One declared field: its name, strategy and the strategy's parameter.

    ``n`` is the cap of ``list`` (0: none) and of ``top`` (required).
    """

    name: str
    merge: str
    n: int = 0
    strategy: Strategy = dataclass_field(init=False, repr=False, compare=False, hash=False)
    _slots: tuple[str, ...] = dataclass_field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        # Plain attributes, set once: read for every executed key.
        strategy = STRATEGIES[self.merge]
        object.__setattr__(self, "strategy", strategy)
        object.__setattr__(self, "_slots", strategy.slot_names(self.name, self.n))

    def slots(self) -> tuple[str, ...]:
        return self._slots

    def result(self, slots: Slots) -> Any:
        """The executed value of this field, from its slots (None if never set)."""
        if self._slots[0] not in slots:
            return None
        return self.strategy.result(self, slots)


class _Rules(dict[str, tuple[Strategy, int]]):
    """Slot name -> (strategy, cap), made on first sight: slot names are few (the
    fields of the routes), and each executed key asks for every one of its slots."""

    def __missing__(self, slot: str) -> tuple[Strategy, int]:
        head, sep, _ = slot.partition(":")
        op, _, n = head.partition("/")
        strategy = BY_OP.get(op)
        if not sep or strategy is None or not (n.isdigit() or n == ""):
            raise SerializationError(f"unknown slot {slot!r}")
        found = self[slot] = (strategy, int(n or 0))
        return found


RULES = _Rules()


def rule(slot: str) -> tuple[Strategy, int]:
    """The strategy merging a slot, and its cap, from the slot's name.

    Raises:
        SerializationError: the name is not ``<op>[/<n>]:<field>`` of a known op.
    """
    return RULES[slot]


class _Mergers(dict[str, Merge]):
    """Slot name -> its in-place merge, made on first sight of the slot."""

    def __missing__(self, slot: str) -> Merge:
        strategy, n = rule(slot)
        merge = self[slot] = strategy.merger(n)
        return merge


MERGERS = _Mergers()
"""The run loop's per-event path: ``MERGERS[slot](cur, new)``, one lookup and one call."""


def merge_slot(slot: str, a: Any, b: Any) -> Any:
    """The merge of two values of one slot, sharing no container with ``a`` or ``b``:
    the same rules as the Lua ``merge_field``."""
    strategy, _ = rule(slot)
    return MERGERS[slot](strategy.copy(a), b)


def merge_into(doc: Slots, slots: Slots) -> None:
    """``slots`` merged into ``doc``; what ``doc`` keeps shares no container with ``slots``."""
    for slot, value in slots.items():
        if slot in doc:
            doc[slot] = MERGERS[slot](doc[slot], value)
        else:
            doc[slot] = RULES[slot][0].copy(value)


class _Encoders(dict[str, Callable[[Any], str]]):
    """Slot name -> its ``Strategy.encoder``, made on first sight of the slot."""

    def __missing__(self, slot: str) -> Callable[[Any], str]:
        strategy, n = rule(slot)
        encode = self[slot] = strategy.encoder(n)
        return encode


ENCODERS = _Encoders()
"""A leaving key's path (``FieldsUpdate.payload``): ``ENCODERS[slot](value)``."""


def encode_slot(slot: str, value: Any) -> str:
    """A slot's value as deposited in Redis."""
    return ENCODERS[slot](value)


def decode_slot(slot: str, text: str) -> Any:
    """A slot's value from Redis."""
    strategy, _ = rule(slot)
    return strategy.decode(text)


def fields_of(doc: Slots) -> tuple[Field, ...]:
    """The fields whose slots ``doc`` holds (for a partial rebuilt without its route)."""
    names = tuple(doc)
    found = _FIELDS_OF.get(names)
    if found is None:
        seen: dict[str, Field] = {}
        for slot in names:
            strategy, n = RULES[slot]
            op, name = slot.partition(":")[0].partition("/")[0], slot.partition(":")[2]
            if op == strategy.op and name not in seen:
                seen[name] = Field(name, strategy.name, n)
        found = tuple(seen.values())
        if len(_FIELDS_OF) > 1024:  # slot sets are few (a route's fields, some null)
            _FIELDS_OF.clear()
        _FIELDS_OF[names] = found
    return found


_FIELDS_OF: dict[tuple[str, ...], tuple[Field, ...]] = {}


def numbers(doc: Slots) -> list[tuple[str, Any]]:
    """``(slot, number)`` for every number SQL stores as itself (to check its range;
    their types also decide the columns' kinds), in the order of ``doc``'s slots."""
    names = tuple(doc)
    plan = _NUMBERED.get(names)
    if plan is None:  # the slots of strategies that have a number, once per set of slots
        plan = tuple(
            (slot, RULES[slot][0].number)
            for slot in names
            if type(RULES[slot][0]).number is not Strategy.number
        )
        if len(_NUMBERED) > 1024:
            _NUMBERED.clear()
        _NUMBERED[names] = plan
    return [(slot, number(doc[slot])) for slot, number in plan]


_NUMBERED: dict[tuple[str, ...], tuple[tuple[str, Callable[[Any], Any]], ...]] = {}


def _not_a_number(what: str, value: Any) -> EventError:
    """Why a value cannot be merged as a number (the event is dead-lettered)."""
    if value.__class__ is int or value.__class__ is float:
        return EventError(f"{what} {short(value)} is outside the 64-bit range")
    return EventError(f"{what} is not a number: {short(value)}")


def _parse_number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _json(value: Any) -> str:
    """The canonical JSON text of a value (keys sorted): what sets, lists, tops and
    distinct counts compare, so equal values are equal whatever their key order.
    Strings, the usual values, are remembered: a field's values repeat."""
    if value.__class__ is int:
        return repr(value)  # an int's JSON is its repr (bool is not int here)
    if value.__class__ is str:
        text = _TEXTS.get(value)
        if text is None:
            if len(_TEXTS) >= 4096:
                _TEXTS.clear()
            text = _TEXTS[value] = orjson.dumps(value).decode()
        return text
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


_TEXTS: dict[str, str] = {}


def check_number(what: str, value: Any) -> None:
    """Raise ``EventError`` unless ``value`` is a number a sink can hold (the
    generated builder inlines the common case and calls this for the rest)."""
    if value.__class__ is int:
        if INT64_MIN <= value < INT64_END:
            return
    elif value.__class__ is float and value - value == 0.0:  # finite
        return
    raise _not_a_number(what, value)


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def finite(value: Any) -> bool:
    """An int within 64 bits or a finite float: what a SQL column can hold."""
    if isinstance(value, int):
        return -(1 << 63) <= value < 1 << 63
    return math.isfinite(value)
