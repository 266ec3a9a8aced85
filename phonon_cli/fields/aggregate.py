"""``FieldsUpdate``: the Update of a route with ``fields``, whose ``doc`` is merge slots."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ..core.reference import Kind
from ..core.update import Update
from ..exceptions import EventError
from ..poison import INT64_END, INT64_MIN, bad_number, short
from . import hll
from .strategies import (
    ENCODERS,
    MERGERS,
    Field,
    Slots,
    by_rank,
    decode_slot,
    fields_of,
    merge_into,
)

if TYPE_CHECKING:
    from ..core.process import Process

MergeEvent = Callable[[Slots, Sequence[Any]], None]


class FieldsUpdate(Update):
    """An update whose ``doc`` holds merge slots (see ``strategies``).

    Partials merge inside Redis field by field, so no step takes a lock and an
    eviction stays one round trip. ``fields`` (the declared fields, in order)
    come from the route; a survivor that rebuilds a partial without them still
    merges it correctly, since each slot's name says how.

    Named apart from the SQL sink built on it (``sinks.sql:Aggregate``), which is
    the name configs use.
    """

    kind: ClassVar[Kind] = "fields"

    def __init__(
        self, process: Process, _id: Any, *args: Any, fields: Sequence[Field] = (), **kwargs: Any
    ) -> None:
        super().__init__(process, _id, *args, **kwargs)
        self.fields = fields = tuple(fields)
        known = _MERGES.get(id(fields))  # a route's fields are one tuple: known by identity
        if known is None or known[0] is not fields:
            known = (fields, merge_event_for(fields))
            if len(_MERGES) > 1024:
                _MERGES.clear()
            _MERGES[id(fields)] = known
        self._merge_event = known[1]

    def merge(self, other: Update) -> None:
        merge_into(self.doc, other.doc)

    def merge_event(self, items: Sequence[Any]) -> None:  # type: ignore[override]
        """Merge what one event adds to each field (its items, one per field, None for
        a skipped null: ``routing.fields.items_builder``), in place: the run loop's
        path, one generated call per event, no Update built.

        Raises:
            EventError: a sum would leave the 64-bit range; nothing was merged.
        """
        self._merge_event(self.doc, items)

    def payload(self) -> str:
        """The slots as deposited in Redis. A distinct_count's texts become registers
        here, in ``doc`` too, so that hashing them happens once as the key leaves
        (the sink's write reads the same registers)."""
        doc = self.doc
        for slot, value in doc.items():
            if value.__class__ is set and slot.startswith("hll:"):
                doc[slot] = hll.registers(value)
        encoders = ENCODERS
        return "".join([f"{slot}\t{encoders[slot](v)}\n" for slot, v in doc.items()])

    def absorb(self, kind: str, items: Sequence[str]) -> None:
        if kind == "json":
            return super().absorb(kind, items)
        doc = self.doc
        for slot, text in zip(items[::2], items[1::2]):
            value = decode_slot(slot, text)
            cur = doc.get(slot)
            doc[slot] = value if cur is None else MERGERS[slot](cur, value)

    def values(self) -> dict[str, Any]:
        """Field name -> executed value, for the declared fields (or every slot's field)."""
        fields = self.fields or fields_of(self.doc)
        return {f.name: f.result(self.doc) for f in fields}


_MERGES: dict[int, tuple[tuple[Field, ...], MergeEvent]] = {}
"""id(fields) -> (fields, their merge): hashing eleven fields per key built cost
more than building the rest of the Update."""


@functools.lru_cache(maxsize=256)
def merge_event_for(fields: tuple[Field, ...]) -> MergeEvent:
    """One generated function merging an event's items into a doc, for these fields
    (``merge_code``, after unpacking the items into its locals)."""
    env: dict[str, Any] = {}
    check, apply = merge_code(fields, env)
    names = "".join(f"x{i}, " for i in range(len(fields)))
    unpack = [f"    ({names}) = items"] if fields else []
    code = "\n".join(["def merge(doc, items):", *unpack, *check, *apply, "    return None"])
    exec(compile(code, "<fields merge>", "exec"), env)  # noqa: S102
    merge_event: MergeEvent = env["merge"]
    merge_event.__doc__ = code  # what was generated, for whoever debugs it
    return merge_event


MERGE_ENV: dict[str, Any] = {
    "EventError": EventError,
    "BY_RANK": by_rank,
    "HLL_HASH": hll.HASH.copy,
    "HLL_REGISTERS": hll.registers,
    "FROM_BYTES": int.from_bytes,
    "bad_number": bad_number,
    "short": short,
    "MIN": INT64_MIN,
    "END": INT64_END,
}
"""What the lines of ``merge_code`` call."""


def merge_code(fields: Sequence[Field], env: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The lines (indented once) merging an event's items, in the locals ``x0``,
    ``x1``... (None for a skipped null), into the dict ``doc``, in place.

    Two parts: the checks, which may raise ``EventError`` and change nothing in
    ``doc``, then the merges, which cannot fail, so that an event refused merges
    nothing. Each strategy's ``add_code`` (the rule of its ``merger``, for the
    state of one event) is written out in turn: no lookup and no call per slot,
    no container built per event. Sums are checked first: an event that would
    take one out of the 64-bit range merges nothing. The caller runs the lines
    (``merge_event_for``; ``routing.fields.fold_code`` with the event's own
    items code before them, for the run loop's path).

    Args:
        fields: the fields, in the order of the items.
        env: the globals the lines will run with: what they call is added.

    Locals the lines use: ``doc``, ``x<i>``, ``x``, ``c``, ``h``, ``hi``, ``hr``.
    """
    env.update(MERGE_ENV)
    check: list[str] = []
    apply: list[str] = []
    for i, f in enumerate(fields):
        strategy, slot = f.strategy, f.slots()[0]
        if strategy.summed:  # the sum replaces x<i> once checked
            env[f"M{i}"] = f"the sum of {slot!r} would leave the 64-bit range"
            check += [
                f"    if x{i} is not None:",
                "        try:",
                f"            x{i} = doc[{slot!r}] + x{i}",
                "        except KeyError:",
                "            pass",
                "        else:",
                f"            if not MIN <= x{i} < END and bad_number(x{i}):",
                f"                raise EventError(M{i} + ' (' + short(x{i}) + ')')",
            ]
        add = strategy.add_code(f.slots(), f.n)
        apply += [f"    if x{i} is not None:", f"        x = x{i}", *(f"        {a}" for a in add)]
    return check, apply


def event_slots(fields: tuple[Field, ...], items: Sequence[Any]) -> Slots:
    """The slots of one event alone: its items merged into an empty doc."""
    doc: Slots = {}
    merge_event_for(fields)(doc, items)
    return doc
