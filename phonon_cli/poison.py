"""Poison values: what an event may not put where a key, a column or a sum is built.

An event is dead-lettered, with the reason, when it would make:

- a key, a templated column name or a spec value from a null, an object or a
  list (``"user": null`` would otherwise become the key ``"null"``, and a spec
  value of null can never be a primary key: its write fails on every retry);
- a number that no sink and no Redis counter can hold: an integer outside
  int64, or a sum that leaves int64 or stops being a finite float once merged.

Caught here, such a value costs one dead letter. Caught later, it failed a
whole batch script in Redis or a whole database transaction, and came back on
every retry. The checks are written so that the common value (a str, a small
int) passes with one class test or one chained comparison.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from .exceptions import EventError

INT64_MIN = -(2**63)
INT64_END = 2**63
"""One past the largest int64: ``INT64_MIN <= n < INT64_END`` is the range."""

SMALL_CONSTANT = 1_000
"""A doc constant at most this large (in magnitude) cannot overflow a sum within any
session (it would take 9e15 events for one key), so merging it needs no check."""


def kind(value: Any) -> str:
    """How a reason names a non-scalar JSON value."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def scalar_text(value: Any, field: str) -> str:
    """A field's value as it reads inside a key or a column name (JSON spelling).

    Raises:
        EventError: the value is null, an object or a list.
    """
    cls = value.__class__
    if cls is str:
        return value  # type: ignore[no-any-return]
    if cls is int or cls is float:
        return repr(value)
    if cls is bool:
        return "true" if value else "false"
    raise EventError(f"field {field!r} is {kind(value)}: a key or column name needs a scalar")


def bad_number(value: Any) -> bool:
    """True for a number no sink can hold: an int outside int64, a non-finite float."""
    if value.__class__ is int:
        return not INT64_MIN <= value < INT64_END
    return value.__class__ is float and not math.isfinite(value)


def check_number(value: Any, what: str) -> Any:
    """``value`` if it is a number a sink can hold.

    Raises:
        EventError: not an int or float, an int outside int64, or not finite.
    """
    cls = value.__class__
    if cls is not int and cls is not float:
        raise EventError(f"{what} is not a number: {short(value)}")
    if bad_number(value):
        raise EventError(f"{what} {short(value)} is outside the 64-bit range")
    return value


def spec_problem(spec: dict[str, Any]) -> str | None:
    """Why ``spec`` cannot identify a record (a null, object, list or out-of-range
    number), or None. Checked once per key, when it enters the cache."""
    for name, value in spec.items():
        cls = value.__class__
        if cls is str or cls is bool:
            continue
        if cls is int or cls is float:
            if bad_number(value):
                return f"spec {name!r} {short(value)} is outside the 64-bit range"
            continue
        return f"spec {name!r} is {kind(value)}: a key needs a scalar"
    return None


def add_sums(merged: dict[str, Any], doc: dict[str, Any]) -> str | None:
    """Add ``doc`` into ``merged`` unless a sum would leave the range a sink can
    hold; then ``merged`` is left as it was and the reason is returned."""
    done: list[tuple[str, Any]] = []
    for k, v in doc.items():
        x = merged.get(k, 0) + v
        if not INT64_MIN <= x < INT64_END and bad_number(x):
            for name, old in reversed(done):
                if old is None:
                    del merged[name]
                else:
                    merged[name] = old
            return f"the sum of {k!r} would leave the 64-bit range ({short(x)})"
        done.append((k, merged.get(k)))
        merged[k] = x
    return None


def short(value: Any, limit: int = 60) -> str:
    """A value as the event spelled it (JSON: ``true``, ``null``, ``"x"``), cut short:
    reasons end up in dead-letter files, one per line, read by people who wrote
    JSON, not Python."""
    if isinstance(value, float) and not math.isfinite(value):
        text = repr(value)  # JSON has no spelling for it (orjson would write null)
    else:
        try:
            text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
