"""The Redis layer: connection and embedded server, key names, Lua scripts, locks.

Nothing here knows about updates or events; everything above reaches Redis
through it.
"""

from __future__ import annotations

from .connection import EmbeddedServer, StoreSettings, clone, connect, is_cluster, redact

__all__ = ["EmbeddedServer", "StoreSettings", "clone", "connect", "is_cluster", "redact"]
