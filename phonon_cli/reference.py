"""Public import path of ``Reference`` (DESIGN §1); the code is in ``core.reference``."""

from .core.reference import Reference

__all__ = ["Reference"]
