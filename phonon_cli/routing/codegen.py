"""Routes compiled to one Python function each, for the run loop's hot path.

A route built from closures (templates.py, routing.py) makes about five calls
per event: the filter, the id, the spec, the doc, and the entry around them.
Measured in the run loop, that was ~1.2 µs of ~2.9 µs per event. For the common
shapes (top-level fields, string filters) this module writes the same logic out
as one function, so each field is looked up once and most calls disappear.
Anything it does not handle inline (dotted paths, non-string filters, doc
builders) it calls exactly as the route would, so the result and the errors are
the same: ``None`` when the filter does not match, ``EventError`` naming the
first missing field in the same order (id fields, then spec fields, then doc).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..poison import SMALL_CONSTANT, scalar_text
from .fields import fold_code
from .filters import condition
from .templates import _missing, _parse

if TYPE_CHECKING:
    from ..core.update import Update
    from .routes import Route, Routed

Fused = Callable[[dict[str, Any]], "Routed | None"]


class _Shape:
    """What ``fuse``, ``merger`` and ``lines_merger`` share, written out as lines of
    one function: the filter, then the id, the spec and the doc key, each field
    looked up once, in the order the route itself reads and checks them (so the
    first error is the route's)."""

    def __init__(
        self,
        route: Route,
        spec_builder: Callable[..., Any],
        doc_builder: Callable[..., Any],
        conditions: list[tuple[str, tuple[Any, ...]]],
        head: str,
    ) -> None:
        self.route = route
        self.env: dict[str, Any] = {
            "ROUTE": route,
            "SPEC": spec_builder,
            "DOC": doc_builder,
            "ID": route.id.text,
            "_missing": _missing,
            "_scalar": scalar_text,
            "str": str,
            "int": int,
            "repr": repr,
        }
        self.lines = [head]
        self.locals: dict[str, str] = {}
        """Field -> the local holding it, once looked up."""
        self.strings: set[str] = set()
        """Locals a filter already proved to be strings: no type check."""
        for i, (path, allowed) in enumerate(conditions):
            if "." not in path and allowed and all(a.__class__ is str for a in allowed):
                self.env[f"W{i}"] = frozenset(allowed)
                self.lines.append(f"    w{i} = event.get({path!r})")
                self.lines.append(f"    if w{i}.__class__ is not str or w{i} not in W{i}:")
                self.lines.append("        return None")
                if path not in self.locals:
                    self.locals[path] = f"w{i}"
                    self.strings.add(f"w{i}")
            else:
                self.env[f"C{i}"] = route_condition(path, allowed)
                self.lines.append(f"    if not C{i}(event):")
                self.lines.append("        return None")
        self.id_expr = self._id()
        self.spec_expr = self._spec()
        self.count: tuple[str, Any] | None = None
        """For the commonest doc, ``{"{event_type}" = 1}``: (an expression of its key,
        the number); None for any other doc (built by ``DOC``)."""
        if not route.fields and len(route.doc) == 1:
            ((name, value),) = route.doc.items()
            if name.key is not None and value.is_constant:
                self.env["N"] = value.source
                k = self.text(name.key)
                self.lines.append(f"    k = {k}")
                self.count = ("k", value.source)

    def local(self, name: str) -> str:
        """The local holding field ``name``, looked up now if not yet (a missing one
        names itself)."""
        if name not in self.locals:
            v = self.locals[name] = f"f{len(self.locals)}"
            self.lines.append("    try:")
            self.lines.append(f"        {v} = event[{name!r}]")
            self.lines.append("    except KeyError as e:")
            self.lines.append("        raise _missing(e) from None")
        return self.locals[name]

    def text(self, name: str) -> str:
        """An expression of field ``name`` as text in a key (a null, object or list
        is an error there)."""
        v = self.local(name)
        if v in self.strings:
            return v
        return (
            f"({v} if {v}.__class__ is str else "
            f"repr({v}) if {v}.__class__ is int else _scalar({v}, {name!r}))"
        )

    def _id(self) -> str:
        source = self.route.id.source
        if isinstance(source, str):
            parts = _parse(source)
            if all(isinstance(p, str) or len(p) == 1 for p in parts):
                # The id's fields are looked up first, then each is kept if plain
                # (str, int, float: str() spells them as JSON does) and else turned
                # into its text by _scalar (which refuses a null, an object or a
                # list), then the id is one f-string: the route's order of errors
                # (a missing id field, then a null one).
                for p in parts:
                    if not isinstance(p, str):
                        self.local(p[0])
                self.env["PLAIN"] = frozenset((str, int, float))
                template = []
                for j, p in enumerate(parts):
                    if isinstance(p, str):
                        template.append(p.replace("{", "{{").replace("}", "}}"))
                        continue
                    v = self.local(p[0])
                    if v not in self.strings:
                        self.lines.append(
                            f"    t{j} = {v} if {v}.__class__ in PLAIN else _scalar({v}, {p[0]!r})"
                        )
                        v = f"t{j}"
                    template.append("{" + v + "}")
                self.lines.append(f"    i = f{''.join(template)!r}")
                return "i"
        self.lines.append("    i = ID(event)")
        return "i"

    def _spec(self) -> str:
        keys = [(name, t.key) for name, t in self.route.spec.items()]
        if all(key is not None for _, key in keys):
            return "{" + ", ".join(f"{name!r}: {self.local(key)}" for name, key in keys) + "}"  # type: ignore[arg-type]
        self.lines.append("    spec = SPEC(event)")
        return "spec"

    def compile(self, name: str) -> Callable[..., Any]:
        code = "\n".join(self.lines)
        label = f"<route {self.route.update_path} {self.route.id.source!r}>"
        exec(compile(code, label, "exec"), self.env)  # noqa: S102
        function: Callable[..., Any] = self.env[name]
        function.__doc__ = code  # what was generated, for whoever debugs it
        return function


def fuse(
    route: Route,
    spec_builder: Callable[..., Any],
    doc_builder: Callable[..., Any],
    conditions: list[tuple[str, tuple[Any, ...]]],
) -> Fused:
    """One function doing ``route.matches`` and ``route.build`` at once.

    Args:
        route: the route (returned as the first item, as ``Router.route`` does).
        spec_builder, doc_builder: the route's own builders, called when the spec
            is not all top-level fields, and always for the doc.
        conditions: the ``when`` table as (dotted path, allowed values).
    """
    shape = _Shape(route, spec_builder, doc_builder, conditions, "def fused(event):")
    doc_expr = "DOC(event)" if shape.count is None else "{k: N}"
    shape.lines.append(f"    return (ROUTE, i, {shape.spec_expr}, {doc_expr})")
    fused: Fused = shape.compile("fused")
    return fused


Merger = Callable[[dict[str, Any], int], "Update | bool | None"]
"""``merger(event, now_ms)``: None when the route does not match the event; the
cached update when the event was merged into it; False when the key is not cached
(the caller builds the update from ``Router.route``)."""


def merger(
    route: Route,
    spec_builder: Callable[..., Any],
    doc_builder: Callable[..., Any],
    conditions: list[tuple[str, tuple[Any, ...]]],
    get: Callable[[Any], Update | None],
    touch: Callable[[Any], object],
) -> Merger | None:
    """The run loop's path for an event whose key is cached: match, key, merge, touch.

    No spec, doc, tuple or Update is built for such an event: the fields the
    spec needs are looked up (a missing one is still an error, as it was for the
    key's first event), the doc goes straight into the cached update (inline for
    the commonest doc of a sums update, else through the class's
    ``merge_event``), and the LRU order is touched in place. None when the
    route's class has no ``merge_event`` (its ``merge`` needs an Update).

    Args:
        get, touch: the cache's lookup (no LRU effect) and mark-as-recent.
    """
    merge_event = route.update.merge_event
    if merge_event is None:
        return None
    shape = _Shape(route, spec_builder, doc_builder, conditions, "def merge(event, now):")
    shape.env.update(GET=get, TOUCH=touch, MERGE=merge_event)
    lines = shape.lines
    lines += ["    u = GET(i)", "    if u is None:", "        return False"]
    if _inline_sum(shape, merge_event):
        lines += ["    d = u.doc", "    d[k] = d.get(k, 0) + N"]
    elif _folds(route, merge_event):
        lines += _fold(shape)
    else:
        # Built only for a cached key: for a new one the general path builds it (once:
        # building may count, as skipped nulls are).
        doc = "{k: N}" if shape.count is not None else "DOC(event)"
        lines.append(f"    MERGE(u, {doc})")
    lines += ["    u.events += 1", "    u.touched_ms = now", "    TOUCH(i)", "    return u"]
    merge: Merger = shape.compile("merge")
    return merge


def _folds(route: Route, merge_event: Any) -> bool:
    """Whether the route's fields can be merged inline: the class merges an event's
    fields as ``FieldsUpdate`` does (a subclass may merge its own way)."""
    from ..fields.aggregate import FieldsUpdate

    return bool(route.fields) and merge_event is FieldsUpdate.merge_event


def _fold(shape: _Shape) -> list[str]:
    """The lines merging the event's fields into the cached ``u`` (fields.fold_code),
    reusing the fields the filter, id and spec already looked up."""
    env: dict[str, Any] = {}
    lines = ["    doc = u.doc", *fold_code(shape.route.fields, env, shape.locals)]
    clash = [name for name in env if name in shape.env and shape.env[name] is not env[name]]
    assert not clash, f"generated names used twice: {clash}"
    shape.env.update(env)
    return lines


def _inline_sum(shape: _Shape, merge_event: Any) -> bool:
    """Whether the merge can be written inline: a counting doc of a small constant
    (it cannot overflow within any session: no check to make) on a sums update."""
    from ..core.update import ConflictFreeUpdate

    return (
        shape.count is not None
        and abs(shape.count[1]) <= SMALL_CONSTANT
        and merge_event is ConflictFreeUpdate.merge_event
    )


LinesMerger = Callable[[list[bytes], int, int], tuple[int, int, "dict[str, Any] | None"]]
"""``merge_lines(lines, start, now_ms) -> (stop, unmatched, event)``: see ``lines_merger``."""


def lines_merger(
    route: Route,
    spec_builder: Callable[..., Any],
    doc_builder: Callable[..., Any],
    conditions: list[tuple[str, tuple[Any, ...]]],
    get: Callable[[Any], Update | None],
    touch: Callable[[Any], object],
) -> LinesMerger | None:
    """``merger``'s work for a run of raw lines, parsing included, with no Python call
    per event: it merges lines from ``start`` on while each is a JSON object the
    route either skips or merges into a cached key, and returns where it stopped
    (the first line it cannot take: not JSON, an error, a key not cached; the
    caller takes that one the general way and calls again), how many it
    skipped, and the stopping line's event when it stopped at a key not cached
    (parsed, and its fields found: the caller need not parse it again), else
    None. For a counting doc of a small constant on a sums update, where
    nothing can fail once the key is found, and for a route with ``fields``,
    whose checks all come before its merges (an event refused stops the run
    with nothing merged); None otherwise.
    """
    import orjson

    from ..exceptions import EventError

    shape = _Shape(route, spec_builder, doc_builder, conditions, "")
    merge_event = route.update.merge_event
    if _inline_sum(shape, merge_event):
        merged = ["    d = u.doc", "    d[k] = d.get(k, 0) + N"]
    elif _folds(route, merge_event):
        merged = _fold(shape)  # checks first: a line refused has merged nothing
    else:
        return None
    shape.env.update(GET=get, TOUCH=touch, LOADS=orjson.loads, EventError=EventError)
    body = []
    for line in [*shape.lines[1:], "    u = GET(i)", "    if u is None:", "        return False"]:
        pad = " " * (8 + len(line) - len(line.lstrip()))
        if line.strip() == "return None":  # the filter skips the event
            body += [f"{pad}skipped += 1", f"{pad}n += 1", f"{pad}continue"]
        elif line.strip() == "raise _missing(e) from None":
            body.append(f"{pad}return n, skipped, None")  # the caller takes it the general way
        elif line.strip() == "return False":  # a key not cached: the caller builds it
            body.append(f"{pad}return n, skipped, event")
        else:
            body.append("        " + line)
    lines = [
        "def merge_lines(lines, n, now):",
        "    skipped = 0",
        "    end = len(lines)",
        "    while n < end:",
        "        try:",
        "            event = LOADS(lines[n])",
        "        except ValueError:",
        "            return n, skipped, None",
        "        if event.__class__ is not dict:",
        "            return n, skipped, None",
        "        try:",
        *body,
        *("            " + line[4:] for line in merged),
        "        except EventError:",
        "            return n, skipped, None",
        "        u.events += 1",
        "        u.touched_ms = now",
        "        TOUCH(i)",
        "        n += 1",
        "    return n, skipped, None",
    ]
    shape.lines = lines
    merge_lines: LinesMerger = shape.compile("merge_lines")
    return merge_lines


def route_condition(path: str, allowed: tuple[Any, ...]) -> Callable[[dict[str, Any]], bool]:
    return condition(tuple(path.split(".")), allowed)
