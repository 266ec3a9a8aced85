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

from ..poison import scalar_text
from .filters import condition
from .templates import _missing, _parse

if TYPE_CHECKING:
    from .routes import Route, Routed

Fused = Callable[[dict[str, Any]], "Routed | None"]


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
    env: dict[str, Any] = {
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
    lines = ["def fused(event):"]
    for i, (path, allowed) in enumerate(conditions):
        if "." not in path and allowed and all(a.__class__ is str for a in allowed):
            env[f"W{i}"] = frozenset(allowed)
            lines.append(f"    v = event.get({path!r})")
            lines.append(f"    if v.__class__ is not str or v not in W{i}:")
            lines.append("        return None")
        else:
            env[f"C{i}"] = route_condition(path, allowed)
            lines.append(f"    if not C{i}(event):")
            lines.append("        return None")

    fetched: dict[str, str] = {}  # field -> local variable, in first-use order

    def local(name: str) -> str:
        if name not in fetched:
            fetched[name] = f"f{len(fetched)}"
        return fetched[name]

    id_expr = ""
    source = route.id.source
    if isinstance(source, str):
        parts = _parse(source)
        if all(isinstance(p, str) or len(p) == 1 for p in parts):
            pieces = []
            for p in parts:
                if isinstance(p, str):
                    pieces.append(repr(p))
                else:
                    v = local(p[0])
                    pieces.append(
                        f"({v} if {v}.__class__ is str else "
                        f"repr({v}) if {v}.__class__ is int else _scalar({v}, {p[0]!r}))"
                    )
            id_expr = " + ".join(pieces) if pieces else "''"
    if not id_expr:
        lines.append("    i = ID(event)")  # first, as the route would: its errors come first
    else:
        # The id's fields first, then the id itself (which refuses a null), then the
        # rest: the route's order of errors (missing id field, null id field, spec...).
        _fetch(lines, fetched)
        lines.append(f"    i = {id_expr}")
    id_fetched = len(fetched)
    spec_expr = "SPEC(event)"
    keys = [(name, t.key) for name, t in route.spec.items()]
    if all(key is not None for _, key in keys):
        spec_expr = "{" + ", ".join(f"{name!r}: {local(key)}" for name, key in keys) + "}"  # type: ignore[arg-type]
    doc_expr = "DOC(event)"
    if not route.fields and len(route.doc) == 1:
        ((name, value),) = route.doc.items()
        if name.key is not None and value.is_constant:
            # The commonest doc, {"{event_type}" = 1}: count events by a field.
            k = local(name.key)
            env["N"] = value.source
            doc_expr = f"{{({k} if {k}.__class__ is str else _scalar({k}, {name.key!r})): N}}"
    _fetch(lines, dict(list(fetched.items())[id_fetched:]))
    lines.append(f"    return (ROUTE, i, {spec_expr}, {doc_expr})")
    code = "\n".join(lines)
    exec(compile(code, f"<route {route.update_path} {route.id.source!r}>", "exec"), env)  # noqa: S102
    fused: Fused = env["fused"]
    fused.__doc__ = code  # what was generated, for whoever debugs it
    return fused


def _fetch(lines: list[str], fields: dict[str, str]) -> None:
    """Look fields up into locals, one try around the lot: a missing one is named."""
    if fields:
        lines.append("    try:")
        lines += [f"        {v} = event[{name!r}]" for name, v in fields.items()]
        lines.append("    except KeyError as e:")
        lines.append("        raise _missing(e) from None")


def route_condition(path: str, allowed: tuple[Any, ...]) -> Callable[[dict[str, Any]], bool]:
    return condition(tuple(path.split(".")), allowed)
