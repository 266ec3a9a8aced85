"""Declarative fields: per-field merge strategies and the ``Aggregate`` update."""

from __future__ import annotations

from .strategies import NUMERIC, STRATEGIES, Aggregate, Field

__all__ = ["NUMERIC", "STRATEGIES", "Aggregate", "Field"]
