"""Declarative fields: one ``Strategy`` per merge strategy and the ``FieldsUpdate``."""

from __future__ import annotations

from .aggregate import FieldsUpdate
from .strategies import STRATEGIES, Field, Strategy

__all__ = ["STRATEGIES", "Field", "FieldsUpdate", "Strategy"]
