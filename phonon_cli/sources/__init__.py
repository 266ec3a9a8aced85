"""Where events come from. Each source feeds chunks of raw lines to the run loop."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Chunk:
    """Raw lines read from one source; ``end`` marks the source exhausted."""

    source: str
    lines: list[bytes] = field(default_factory=list)
    end: bool = False
    too_long: int = 0
    """Lines dropped for exceeding the line limit (each also sent as a stub line)."""
    partition: str | None = None
    """Where offsets are kept for this chunk; None for sources with nothing to commit."""
    first_offset: int = 0
    """Offset of ``lines[0]``; line i has offset ``first_offset + i``."""


class Source(Protocol):
    """A reader that runs on its own thread and puts ``Chunk``s on the run loop's queue.

    A source must never block the run loop: reading happens on the source's
    thread, and the bounded queue pushes back when the loop falls behind.
    """

    name: str

    def start(self, out: queue.Queue[Chunk]) -> None:
        """Begin reading into ``out``; put a ``Chunk(end=True)`` when done."""

    def stop(self) -> None:
        """Stop reading soon (the thread is a daemon: it never holds up exit)."""

    def commit(self, partition: str, offset: int) -> None:
        """Every event of ``partition`` below ``offset`` is safe (executed or cached in
        Redis): a restart may resume there, and a stream may acknowledge them."""


def open_source(spec: str) -> Source:
    """The source a ``--source`` value names.

    Raises:
        SourceError: for a kind that is unknown (or not built yet).
    """
    from ..exceptions import SourceError
    from .stdin import StdinSource

    if spec == "-":
        return StdinSource()
    kind = spec.split(":", 1)[0]
    raise SourceError(
        f"unknown source {spec!r}: use '-' for stdin "
        f"(file:, redis-pubsub: and redis-stream: are not available yet; got {kind!r})"
    )
