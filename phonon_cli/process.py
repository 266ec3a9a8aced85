"""Public import path of ``Process`` (DESIGN §1); the code is in ``core.process``."""

from .core.process import Process

__all__ = ["Process"]
