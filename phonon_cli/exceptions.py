"""phonon's exceptions. The library raises these; only the CLI turns them into exit codes."""

from __future__ import annotations


class PhononError(Exception):
    """Root of every error phonon raises on purpose."""


class ConfigError(PhononError):
    """A config file is invalid. Carries the file and the key at fault."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        self.path = path
        self.key = key
        self.reason = message
        """What is wrong, without the file and key (to re-raise it under another key)."""
        where = ": ".join(p for p in (path, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


class StoreUnavailable(PhononError):
    """Redis cannot be reached. The message names the URL without its password."""


class Fenced(PhononError):
    """This process was declared dead (silent past its TTL) and what it held was
    recovered by others: Redis refuses every change it asks for under that id."""


class StoreReset(PhononError):
    """The namespace's state vanished from Redis (a restart without persistence,
    FLUSHALL): what this process had deposited or held there is gone."""


class LockError(PhononError):
    def __init__(self, message: str, *, lock_name: str | None = None) -> None:
        self.lock_name = lock_name
        super().__init__(message)


class AlreadyLocked(LockError):
    """The lock is held by someone else (and we did not, or could no longer, wait)."""


class LockNotOwned(LockError):
    """Releasing or extending a lock that expired or belongs to someone else."""


class SerializationError(PhononError):
    """State could not be turned into JSON, or JSON back into state."""


class SourceError(PhononError):
    """An event source cannot be opened or read."""


class SinkError(PhononError):
    """A sink cannot write (after its retries)."""


class OutputClosed(SinkError):
    """Whoever read the sink's output (stdout) went away, as in ``phonon run | head``.

    No retry can help and no other key can be written there: the run stops reading
    and keeps everything not written in Redis, like a second signal would."""


class EventError(PhononError):
    """An event that cannot be routed (a missing field, a doc value that is not a
    number). Its message is the reason written to the dead-letter file."""
