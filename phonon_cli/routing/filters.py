"""Filters: the ``when`` and ``ends_when`` tests of a route, compiled once.

JSON equality throughout (``true`` is not ``1``); an absent field never matches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .templates import Event, Getter

__all__ = ["Scalar", "condition", "matcher"]

Scalar = str | int | float | bool | None
"""What a ``when`` filter compares a field with."""

_MISSING: Any = object()
"""Stands for an absent field where ``None`` (JSON null) is a legitimate value."""


def _probe(path: tuple[str, ...]) -> Getter:
    """Like ``templates._getter`` but returns ``_MISSING`` instead of raising: for filters,
    where an absent field simply means "no match"."""
    if len(path) == 1:
        (key,) = path

        def probe(event: Event) -> Any:
            return event.get(key, _MISSING)

        return probe

    def probe_nested(event: Event) -> Any:
        value: Any = event
        for key in path:
            if value.__class__ is not dict:
                return _MISSING
            value = value.get(key, _MISSING)
        return value

    return probe_nested


def _same(value: Any, wanted: Any) -> bool:
    """JSON equality: ``true`` is not ``1``, though Python says ``True == 1``."""
    return bool(value == wanted) and (value.__class__ is bool) == (wanted.__class__ is bool)


def condition(path: tuple[str, ...], allowed: tuple[Scalar, ...]) -> Callable[[Event], bool]:
    """A test of one field against the value(s) a ``when`` filter allows."""
    probe = _probe(path)
    if all(a.__class__ is str for a in allowed):
        # The common case (event types, names): a str compares with str only, so
        # a hash lookup decides; the class test keeps unhashable values out of it.
        if len(allowed) == 1 and len(path) == 1:
            (key,), (wanted,) = path, allowed
            return lambda event: event.get(key) == wanted
        strings = frozenset(allowed)
        if len(path) == 1:
            (key,) = path
            # A missing field gives None, which is not a str: no match, no sentinel.
            return lambda event: (v := event.get(key)).__class__ is str and v in strings
        return lambda event: (v := probe(event)).__class__ is str and v in strings

    def test(event: Event) -> bool:
        value = probe(event)
        if value is _MISSING:
            return False
        return any(_same(value, a) for a in allowed)

    return test


def matcher(when: Mapping[str, tuple[Scalar, ...]]) -> Callable[[Event], bool] | None:
    """The compiled test of a ``when`` (or ``ends_when``) table; None when it is empty."""
    tests = tuple(
        # A bare value (a Route built by hand) is one allowed value, not a sequence.
        condition(tuple(path.split(".")), tuple(v) if isinstance(v, (list, tuple)) else (v,))
        for path, v in when.items()
    )
    if not tests:
        return None
    if len(tests) == 1:
        return tests[0]

    def all_match(event: Event) -> bool:
        for test in tests:
            if not test(event):
                return False
        return True

    return all_match
