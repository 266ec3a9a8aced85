"""Which processes are alive: those whose alive key (a TTL of three heartbeats) exists.

One pipelined EXISTS per id, one round trip for any number of ids. Callers that
read other things about the same processes in the same round trip (status's
process table, flush's acks) queue ``EXISTS keys.alive(id)`` in their own pipeline.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .keys import Keys


def alive(client: Any, keys: Keys, ids: Iterable[str]) -> set[str]:
    """The ids among ``ids`` whose process is alive now."""
    ids = list(ids)
    if not ids:
        return set()
    pipe = client.pipeline(transaction=False)
    for pid in ids:
        pipe.exists(keys.alive(pid))
    return {pid for pid, up in zip(ids, pipe.execute()) if up}
