"""JSON lines on standard input."""

from __future__ import annotations

import queue
import sys
from typing import BinaryIO

from .. import defaults
from .base import TOO_LONG, Chunk, ThreadedSource

READ_SIZE = 1 << 16
"""Bytes per read from the pipe."""


class StdinSource(ThreadedSource):
    """Reads stdin on a daemon thread, a chunk of whole lines at a time.

    A line longer than ``MAX_LINE_BYTES`` is not kept whole: its first KiB goes
    on as a stub marked too long, so the run loop dead-letters it with a reason
    instead of holding megabytes.
    """

    name = "-"

    def __init__(self, stream: BinaryIO | None = None) -> None:
        super().__init__()
        self.stream = stream if stream is not None else sys.stdin.buffer

    def commit(self, partition: str, offset: int) -> None:
        """Stdin cannot be replayed: there is nothing to commit."""

    def _run(self, out: queue.Queue[Chunk]) -> None:
        limit = defaults.MAX_LINE_BYTES
        read = getattr(self.stream, "read1", self.stream.read)
        rest = b""
        skipping = False  # inside a line that was too long
        while not self._stop.is_set():
            data = read(READ_SIZE)
            if not data:
                break
            if skipping and b"\n" not in data:
                continue  # still inside the line that was too long: drop it
            lines = (rest + data).split(b"\n")
            rest = lines.pop()
            chunk = Chunk(self.name, lines)
            if skipping:
                lines.pop(0)  # the tail of the long line
                skipping = False
            if len(rest) > limit:
                chunk.lines.append(TOO_LONG + rest[:1024])
                chunk.too_long += 1
                rest = b""
                skipping = True
            if chunk.lines:
                out.put(chunk)
        if rest and not skipping:
            out.put(Chunk(self.name, [rest]))
        out.put(Chunk(self.name, end=True))
