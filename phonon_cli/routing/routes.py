"""From an event to the updates it feeds: routes (filters: ``filters``; templates: ``templates``).

Everything a route needs is compiled once, when the config is loaded, into small
closures, so that routing one event is a handful of dict lookups: no template is
parsed, no regex run and no exception raised on the common path. This runs once
per event, millions of times, so the choices below favour the per-event cost over
elegance of the compiled form.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..exceptions import EventError
from ..poison import bad_number, scalar_text
from .codegen import LinesMerger, Merger, fuse, lines_merger, merger
from .fields import items_builder
from .filters import Scalar, matcher
from .templates import Event, Getter, Template, _missing, _short

if TYPE_CHECKING:
    from ..core.update import Update
    from ..fields.strategies import Field
    from .fields import RouteField

__all__ = ["Built", "Event", "Route", "Routed", "Router", "Scalar", "Template", "matcher"]

Built = tuple[str, dict[str, Any], Any]
"""What a route makes of an event: the id, the spec and the doc."""

Routed = tuple["Route", str, dict[str, Any], Any]
"""One entry of ``Router.route``: the route, the id, the spec and the doc."""


@dataclass(frozen=True, slots=True)
class Route:
    """Which events feed which ``Update`` class, and how to key and fill it.

    Construct it with templates already compiled (``Config`` does this from a
    file); everything the hot path calls is derived in ``__post_init__``.

    Attributes:
        update: the ``Update`` subclass to build.
        update_path: ``update`` as written in the config (for messages).
        id: the key's template; always rendered as a string.
        when: dotted field path -> values, any of which matches; every field
            must match. Empty: every event matches.
        collection, database: passed to the update as they are.
        spec: name -> template: what identifies the record in the database.
        doc: template of a key -> template of a number: what gets aggregated.
        soft_session_s, hard_session_s: per-route session lengths in seconds
            (``idle`` and ``max_age`` in the config); None means the global ones.
        fields: per-field merge strategies (``fieldconfig.RouteField``); when
            given, the doc an event makes is what it adds to each field: a tuple
            of items (``fields.items_builder``), merged by ``FieldsUpdate.merge_event``.
        max_events: end a key's session once it has merged this many events.
        ends_when: ``event -> bool``: end a key's session at once, after merging
            an event for which it is true.
    """

    update: type[Update]
    update_path: str
    id: Template
    when: Mapping[str, tuple[Scalar, ...]] = field(default_factory=dict, hash=False)
    collection: str | None = None
    database: str | None = None
    spec: Mapping[str, Template] = field(default_factory=dict, hash=False)
    doc: Mapping[Template, Template] = field(default_factory=dict, hash=False)
    soft_session_s: float | None = None
    hard_session_s: float | None = None
    fields: tuple[RouteField, ...] = ()
    max_events: int | None = None
    ends_when: Callable[[Event], bool] | None = field(default=None, compare=False, hash=False)

    declared: tuple[Field, ...] = field(init=False, repr=False, compare=False, hash=False)
    """The fields' ``Field``s, in order: what a ``FieldsUpdate`` of this route merges."""
    _match: Callable[[Event], bool] | None = field(
        init=False, repr=False, compare=False, hash=False
    )
    """The compiled ``when``; None when there is none (no call at all then)."""
    _entry: Callable[[Event], Routed] = field(init=False, repr=False, compare=False, hash=False)
    """The compiled ``build``, returning the ``Router.route`` entry directly."""
    _fused: Callable[[Event], Routed | None] = field(
        init=False, repr=False, compare=False, hash=False
    )
    """``matches`` and ``build`` as one generated function (codegen.py): None when
    the filter does not match. The run loop's path."""
    _merger: Callable[..., Merger | None] = field(init=False, repr=False, compare=False, hash=False)
    """``merger`` (codegen.py) with this route's builders, waiting for a cache."""
    _lines_merger: Callable[..., LinesMerger | None] = field(
        init=False, repr=False, compare=False, hash=False
    )
    """``lines_merger`` (codegen.py) likewise."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: the derived fields are set once, here
        set_(self, "_match", matcher(self.when))
        set_(self, "declared", tuple(f.field for f in self.fields))
        route, id_text = self, self.id.text
        spec = _spec_builder(self.spec)
        doc = items_builder(self.fields) if self.fields else _doc_builder(self.doc)

        def entry(event: Event) -> Routed:
            return route, id_text(event), spec(event), doc(event)

        set_(self, "_entry", entry)
        conditions = [
            (path, tuple(v) if isinstance(v, (list, tuple)) else (v,))
            for path, v in self.when.items()
        ]
        set_(self, "_fused", fuse(self, spec, doc, conditions))
        set_(self, "_merger", functools.partial(merger, self, spec, doc, conditions))
        set_(
            self,
            "_lines_merger",
            functools.partial(lines_merger, self, spec, doc, conditions),
        )

    def merger(
        self, get: Callable[[Any], Update | None], touch: Callable[[Any], object]
    ) -> Merger | None:
        """A function merging an event into the cached update of its key, in place
        (codegen.py ``merger``); None when the update class cannot merge an event
        without building an Update.

        Args:
            get, touch: the cache's lookup by id and its mark-as-most-recent.
        """
        return self._merger(get, touch)

    def lines_merger(
        self, get: Callable[[Any], Update | None], touch: Callable[[Any], object]
    ) -> LinesMerger | None:
        """``merger`` for a run of raw lines (codegen.py ``lines_merger``); None for
        any shape but a counting doc on a sums update or a route with ``fields``."""
        return self._lines_merger(get, touch)

    def matches(self, event: Event) -> bool:
        """True when every ``when`` field is present and equals one of its values."""
        return self._match is None or self._match(event)

    def build(self, event: Event) -> Built:
        """The id (a string), spec and doc this route makes of ``event``.

        Raises:
            EventError: a field is missing, or a doc (or ``fields``) value has the
                wrong type.
        """
        _, id_, spec, doc = self._entry(event)
        return id_, spec, doc


def _spec_builder(spec: Mapping[str, Template]) -> Callable[[Event], dict[str, Any]]:
    if not spec:
        return lambda event: {}
    keys = tuple((name, t.key) for name, t in spec.items())
    if all(key is not None for _, key in keys):
        # Every value is a top-level field, as spec usually is: plain lookups.
        def lookup(event: Event) -> dict[str, Any]:
            try:
                return {name: event[key] for name, key in keys}  # type: ignore[index]
            except KeyError as e:
                raise _missing(e) from None

        return lookup
    renders = tuple((name, t.render) for name, t in spec.items())
    return lambda event: {name: render(event) for name, render in renders}


def _doc_value(key: Callable[[Event], str], value: Template) -> Getter:
    """The doc value's renderer; a template's result is checked to be a number,
    a constant was checked when the config was loaded."""
    if value.is_constant:
        return value.render
    render = value.render

    def number(event: Event) -> Any:
        v = render(event)
        if v.__class__ is int or v.__class__ is float:
            if bad_number(v):
                raise EventError(f"doc value for {key(event)!r} is outside the 64-bit range")
            return v
        raise EventError(f"doc value for {key(event)!r} is not a number: {_short(v)}")

    return number


def _doc_builder(doc: Mapping[Template, Template]) -> Callable[[Event], dict[str, Any]]:
    """One function building the doc. The commonest doc, ``{"{event_type}": 1}``
    (count events by a field), gets a specialised one: one lookup, one dict."""
    if not doc:
        return lambda event: {}
    if len(doc) == 1:
        ((name, value),) = doc.items()
        if name.key is not None and value.is_constant:
            field_name, number = name.key, value.source

            def count(event: Event) -> dict[str, Any]:
                try:
                    k = event[field_name]
                except KeyError as e:
                    raise _missing(e) from None
                return {k if k.__class__ is str else scalar_text(k, field_name): number}

            return count
        key, get = name.text, _doc_value(name.text, value)
        return lambda event: {key(event): get(event)}
    entries = tuple((k.text, _doc_value(k.text, v)) for k, v in doc.items())
    if all(k.is_constant for k in doc):
        # Distinct constant keys cannot collide.
        return lambda event: {key(event): get(event) for key, get in entries}

    def summed(event: Event) -> dict[str, Any]:
        # Two templated keys may render the same name ("{a}" and "total"): the
        # doc is summed, so their values add up rather than one hiding the other.
        out: dict[str, Any] = {}
        for key, get in entries:
            k, v = key(event), get(event)
            if k in out:
                v = out[k] + v
                if bad_number(v):
                    raise EventError(f"doc value for {k!r} is outside the 64-bit range")
            out[k] = v
        return out

    return summed


class Router:
    """Every route of a config, applied to events in order.

    Args:
        routes: the routes; several may match one event.
    """

    __slots__ = ("routes", "_fused")

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        self._fused = tuple(r._fused for r in self.routes)

    def route(self, event: Event) -> list[Routed]:
        """``(route, id, spec, doc)`` for every route matching ``event``; ``[]`` if none.

        Args:
            event: one decoded JSON object (a dict; the caller checks).

        Raises:
            EventError: a matching route could not be built (the first one that
                failed); the caller dead-letters the whole event, so that no
                route counts an event another route rejected.
        """
        out: list[Routed] = []
        for fused in self._fused:
            routed = fused(event)
            if routed is not None:
                out.append(routed)
        return out
