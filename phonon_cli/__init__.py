"""phonon: aggregate event streams across many workers, one write per key per session."""

from __future__ import annotations

from .core.cache import LruCache
from .core.process import Process
from .core.reference import Reference
from .core.update import ConflictFreeUpdate, Update
from .exceptions import (
    AlreadyLocked,
    ConfigError,
    LockError,
    LockNotOwned,
    PhononError,
    SerializationError,
    SinkError,
    SourceError,
    StoreUnavailable,
)
from .store.lock import Lock

__all__ = [
    "AlreadyLocked",
    "ConfigError",
    "ConflictFreeUpdate",
    "Lock",
    "LockError",
    "LockNotOwned",
    "LruCache",
    "PhononError",
    "Process",
    "Reference",
    "SerializationError",
    "SinkError",
    "SourceError",
    "StoreUnavailable",
    "Update",
]
__version__ = "0.1.0"
