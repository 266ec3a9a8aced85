"""phonon: aggregate event streams across many workers, one write per key per session."""

from __future__ import annotations

from .cache import LruCache
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
from .lock import Lock
from .process import Process
from .reference import Reference
from .update import ConflictFreeUpdate, Update

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
