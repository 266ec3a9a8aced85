"""JSON lines on standard input."""

from __future__ import annotations

import os
import queue
import sys
from collections.abc import Callable
from typing import BinaryIO

from .. import defaults
from ..exceptions import SourceError
from .base import Chunk, ThreadedSource, split_lines, too_long

READ_SIZE = 1 << 16
"""Bytes per read from the pipe."""


class StdinSource(ThreadedSource):
    """Reads stdin on a daemon thread, a chunk of whole lines at a time.

    A line longer than ``max_line_bytes`` goes on as a ``Reject`` with its bytes
    (up to ``DEAD_LETTER_KEEP_BYTES``), so the run loop dead-letters it whole.

    The process's own stdin is read with ``os.read`` on its descriptor, not
    through ``sys.stdin.buffer``: a daemon thread blocked inside a buffered read
    holds that buffer's lock, and the interpreter aborts at exit when it cannot
    take it (``Fatal Python error: _enter_buffered_busy``, seen when SIGTERM ends
    a run whose stdin is still open).
    """

    name = "-"

    def __init__(self, stream: BinaryIO | None = None) -> None:
        super().__init__()
        self._read: Callable[[int], bytes]
        if stream is not None:
            self._read = getattr(stream, "read1", stream.read)
        elif sys.stdin is None:
            raise SourceError("stdin is closed: pipe events in, or read another --source")
        else:
            fd = sys.stdin.fileno()
            self._read = lambda n: os.read(fd, n)

    def commit(self, partition: str, offset: int) -> None:
        """Stdin cannot be replayed: there is nothing to commit."""

    def _run(self, out: queue.Queue[Chunk]) -> None:
        limit = self.max_line_bytes
        keep = defaults.DEAD_LETTER_KEEP_BYTES
        rest = b""
        long: bytearray | None = None  # a line over the limit, still being read
        long_len = 0
        while not self._stop.is_set():
            data = self._read(READ_SIZE)
            if not data:
                break
            chunk = Chunk(self.name)
            if long is not None:
                end = data.find(b"\n")
                piece = data if end < 0 else data[:end]
                long_len += len(piece)
                long += piece[: max(0, keep - len(long))]
                if end < 0:
                    continue
                chunk.reject(too_long(bytes(long), limit, long_len))
                long = None
                data = data[end + 1 :]
            whole = len(rest) + len(data) > limit  # then a line in it may be too long
            lines = (rest + data).split(b"\n")
            rest = lines.pop()
            if whole:
                split_lines(lines, chunk, limit)
            elif chunk.lines:
                chunk.lines += lines
            else:
                chunk.lines = lines
            if len(rest) > limit:
                long, long_len, rest = bytearray(rest[:keep]), len(rest), b""
            if chunk.lines:
                out.put(chunk)
        last = Chunk(self.name)
        if long is not None:
            last.reject(too_long(bytes(long), limit, long_len))
        elif rest:
            last.lines.append(rest)
        if last.lines:
            out.put(last)
        out.put(Chunk(self.name, end=True))
