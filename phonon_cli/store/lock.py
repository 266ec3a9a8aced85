"""A token lock in Redis: only its owner can release it, and it expires if the owner dies."""

from __future__ import annotations

import secrets
import time
from types import TracebackType

import redis

from .. import defaults
from ..exceptions import AlreadyLocked, LockNotOwned
from . import scripts


class Lock:
    """``SET key token NX PX ttl`` to take, a compare-and-delete script to release.

    The expiry is what keeps a dead owner from blocking everyone forever; the
    token is what keeps a slow owner whose lock expired from releasing the lock
    that someone else has taken since.

    Args:
        client: the connection to use.
        key: the lock's Redis key (built by ``Keys``).
        ttl_ms: expiry, in milliseconds.
        block: wait for the lock (up to ``timeout_s``) instead of failing at once.
        owner: who takes it (a process id), readable by others with ``owner_of``.
        timeout_s: how long a blocking acquire waits before raising ``AlreadyLocked``.
    """

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        *,
        ttl_ms: int = defaults.LOCK_TTL_MS,
        block: bool = True,
        timeout_s: float = defaults.LOCK_TIMEOUT_S,
        owner: str | None = None,
    ) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = ttl_ms
        self.block = block
        self.timeout_s = timeout_s
        self.token: str | None = None
        self.owner = owner
        """Put at the front of the token (``<owner>.<random>``), so that whoever finds
        the lock taken can tell who holds it (``owner_of``)."""

    def acquire(self, block: bool | None = None) -> Lock:
        """Take the lock.

        Raises:
            AlreadyLocked: someone else holds it (at once when not blocking,
                after ``timeout_s`` when blocking).
        """
        block = self.block if block is None else block
        token = secrets.token_hex(16)
        if self.owner:
            token = f"{self.owner}.{token}"
        deadline = time.monotonic() + self.timeout_s
        pause = defaults.LOCK_POLL_S
        while not self.client.set(self.key, token, nx=True, px=self.ttl_ms):
            if not block or time.monotonic() >= deadline:
                raise AlreadyLocked(f"{self.key} is locked by another owner", lock_name=self.key)
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.1)
        self.token = token
        return self

    def release(self) -> None:
        """Release the lock if we still own it.

        Raises:
            LockNotOwned: it expired, or another owner has it now.
        """
        token, self.token = self.token, None
        if token is None or not scripts.LOCK_RELEASE(
            keys=[self.key], args=[token], client=self.client
        ):
            raise LockNotOwned(f"{self.key} is not owned by this lock", lock_name=self.key)

    def extend(self, ttl_ms: int | None = None) -> None:
        """Push the expiry out again, for work that outlives ``ttl_ms``."""
        if self.token is None or not scripts.LOCK_EXTEND(
            keys=[self.key], args=[self.token, ttl_ms or self.ttl_ms], client=self.client
        ):
            raise LockNotOwned(f"{self.key} is not owned by this lock", lock_name=self.key)

    def take_over(self, token: str) -> bool:
        """Take the lock from the owner of ``token``, if that token still holds it.

        Only for a lock whose owner is known to be dead: the caller checks that
        (the expiry would free it too, only later).
        """
        mine = secrets.token_hex(16)
        if self.owner:
            mine = f"{self.owner}.{mine}"
        if not scripts.LOCK_TAKE_OVER(
            keys=[self.key], args=[token, mine, self.ttl_ms], client=self.client
        ):
            return False
        self.token = mine
        return True

    @property
    def owned(self) -> bool:
        return self.token is not None and self.client.get(self.key) == self.token

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def owner_of(token: str | None) -> str | None:
    """The owner a lock's token names, or None (no lock, or taken without an owner)."""
    if not token or "." not in token:
        return None
    return token.rpartition(".")[0] or None
