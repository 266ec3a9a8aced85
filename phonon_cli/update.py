"""Public import path of ``Update`` and ``ConflictFreeUpdate`` (DESIGN §1); the code is
in ``core.update``."""

from .core.update import ConflictFreeUpdate, Update

__all__ = ["ConflictFreeUpdate", "Update"]
