"""The dead-letter file: every line that could not be aggregated, with why.

One JSON object a line: ``source``, ``reason`` and the line exactly as read, so
that it can be fixed and replayed: ``line`` when it is UTF-8 text, else
``line_base64``; ``truncated: true`` when a line was too long to keep whole
(past ``defaults.DEAD_LETTER_KEEP_BYTES``).
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import IO

import orjson

log = logging.getLogger(__name__)


def dead_letter(source: str, line: bytes, reason: str, truncated: bool = False) -> bytes:
    """One dead-letter record, newline included."""
    record: dict[str, object] = {"source": source, "reason": reason}
    try:
        record["line"] = line.decode("utf-8")
    except UnicodeDecodeError:
        record["line_base64"] = base64.b64encode(line).decode("ascii")
    if truncated:
        record["truncated"] = True
    return orjson.dumps(record) + b"\n"


class DeadLetters:
    """Appends dead letters to a file (opened on the first one), or logs them at
    debug level when there is no file."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._file: IO[bytes] | None = None

    def write(self, source: str, line: bytes, reason: str, truncated: bool = False) -> None:
        if self.path is None:
            log.debug("dead letter from %s: %s", source, reason)
            return
        if self._file is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - closed by close()
        self._file.write(dead_letter(source, line, reason, truncated))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
