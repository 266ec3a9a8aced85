"""Built-in sinks: updates that write their aggregate somewhere, so a config needs no code.

What they share lives here: the parsing of ``database`` URLs, and the
per-thread connection cache.

Why per thread: a worker executes from its run loop, and its heartbeat thread
may execute partials it recovered from a dead worker at the same moment. A
database connection is not safe to share between two threads mid-transaction,
so each (thread, database) pair gets its own, opened on first use and reused
for every later batch. ``close_all()`` closes them at exit.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from ..exceptions import SinkError
from ..store.connection import redact

log = logging.getLogger(__name__)

__all__ = ["Database", "close_all", "discard", "parse_database", "thread_handle"]


class Closeable(Protocol):
    def close(self) -> None: ...


@dataclass(frozen=True)
class Database:
    """A parsed ``database`` setting.

    Attributes:
        kind: ``"sqlite"`` or ``"postgresql"``.
        url: the URL as given (connect with it, never log it: see ``display``).
        path: the SQLite file; None for PostgreSQL.
    """

    kind: Literal["sqlite", "postgresql"]
    url: str
    path: str | None = None

    @property
    def display(self) -> str:
        """The URL without its password, safe for messages and logs."""
        return redact(self.url)


def parse_database(url: object) -> Database:
    """Parse a SQL sink's ``database`` URL (cached: every executed key asks).

    Raises:
        SinkError: see ``_parse_database``.
    """
    if isinstance(url, str):
        return _parse_database_cached(url)
    return _parse_database(url)


@functools.lru_cache(maxsize=64)
def _parse_database_cached(url: str) -> Database:
    return _parse_database(url)


def _parse_database(url: object) -> Database:
    """Parse a SQL sink's ``database`` URL.

    Accepted: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``,
    ``postgresql://...`` and ``postgres://...`` (libpq URLs, passed as given).
    An in-memory SQLite database is refused: every worker process (and thread)
    would get a private one, so the aggregates would be written nowhere useful.

    Raises:
        SinkError: anything else; the message names the URL without its password.
    """
    if not isinstance(url, str) or not url:
        raise SinkError(f"database {url!r}: expected sqlite:///PATH or postgresql://...")
    if url.startswith(("postgresql://", "postgres://")):
        return Database("postgresql", url)
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if path.partition("?")[0] in ("", ":memory:") or path.startswith("file:"):
            raise SinkError(
                f"database {redact(url)}: an in-memory or empty SQLite path "
                "cannot be shared between workers; give a file path"
            )
        return Database("sqlite", url, path)
    raise SinkError(
        f"database {redact(url)}: expected sqlite:///PATH (relative), "
        "sqlite:////PATH (absolute) or postgresql://..."
    )


# -- per-thread connections ------------------------------------------------------------

H = TypeVar("H", bound=Closeable)

_handles: dict[tuple[int, str], Closeable] = {}
_handles_lock = threading.Lock()


def thread_handle(key: str, opener: Callable[[], H]) -> H:
    """This thread's handle for ``key`` (a database URL), opened with ``opener`` on first use.

    Keyed by thread ident: a new thread that reuses the ident of a finished one
    takes over its idle handle, which is harmless (nobody else can be using it).
    The opener runs outside the lock so one slow connect does not stall the
    other threads.
    """
    k = (threading.get_ident(), key)
    with _handles_lock:
        handle = _handles.get(k)
    if handle is None:
        handle = opener()
        with _handles_lock:
            _handles[k] = handle
    return handle  # type: ignore[return-value]


def discard(key: str) -> None:
    """Close and forget this thread's handle for ``key`` (after a failure: the next
    batch reconnects and re-reads the schema instead of trusting a stale cache)."""
    with _handles_lock:
        handle = _handles.pop((threading.get_ident(), key), None)
    if handle is not None:
        _close(handle)


def close_all() -> None:
    """Close every thread's sink connections (the run loop calls this at exit)."""
    with _handles_lock:
        handles = list(_handles.values())
        _handles.clear()
    for handle in handles:
        _close(handle)


def _close(handle: Closeable) -> None:
    try:
        handle.close()
    except Exception as e:  # noqa: BLE001 - closing a broken connection must not mask the rest
        log.warning("closing sink connection failed: %s", e)
