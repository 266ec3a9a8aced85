"""``FieldsUpdate``: the Update of a route with ``fields``, whose ``doc`` is merge slots."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ..core.update import Update
from ..exceptions import EventError
from .strategies import (
    MERGERS,
    Field,
    decode_slot,
    encode_slot,
    fields_of,
    merge_into,
    sum_problem,
)

if TYPE_CHECKING:
    from ..core.process import Process


class FieldsUpdate(Update):
    """An update whose ``doc`` holds merge slots (see ``strategies``).

    Partials merge inside Redis field by field, so no step takes a lock and an
    eviction stays one round trip. ``fields`` (the declared fields, in order)
    come from the route; a survivor that rebuilds a partial without them still
    merges it correctly, since each slot's name says how.

    Named apart from the SQL sink built on it (``sinks.sql:Aggregate``), which is
    the name configs use.
    """

    kind: ClassVar[str] = "fields"

    def __init__(
        self, process: Process, _id: Any, *args: Any, fields: Sequence[Field] = (), **kwargs: Any
    ) -> None:
        super().__init__(process, _id, *args, **kwargs)
        self.fields = tuple(fields)

    def merge(self, other: Update) -> None:
        merge_into(self.doc, other.doc)

    def merge_slots(self, slots: dict[str, Any]) -> None:
        """Merge one event's slots, in place (the run loop's path: no Update built
        per event, one lookup and one call per slot; ``slots`` is the event's own,
        so its containers may be kept).

        Raises:
            EventError: a sum would leave the 64-bit range; nothing was merged.
        """
        doc = self.doc
        problem = sum_problem(doc, slots)
        if problem is not None:
            raise EventError(problem)
        for slot, value in slots.items():
            cur = doc.get(slot)
            doc[slot] = value if cur is None else MERGERS[slot](cur, value)

    def payload(self) -> str:
        return "".join(f"{slot}\t{encode_slot(slot, v)}\n" for slot, v in self.doc.items())

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
