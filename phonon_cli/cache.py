"""Public import path of ``LruCache`` (DESIGN §1); the code is in ``core.cache``."""

from .core.cache import LruCache

__all__ = ["LruCache"]
