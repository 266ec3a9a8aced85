"""Logging set-up for the command line (the library only ever calls getLogger).

Two formats on stderr: ``text`` for people (``phonon: WARNING: ...``) and ``json``
for log shippers (one object a line: ``ts``, ``level``, ``logger``, ``message``,
and any ``extra`` fields). In both, an error repeated word for word (a sink down,
a broken pipe, the same bad key) is folded: the first is written, the repeats are
counted, and one line says how many there were ("... and 2,314 more like it")
when something else is logged, after ``FOLD_WINDOW_S``, or at exit, so that an
outage is a few lines rather than thousands.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Callable
from typing import IO, Any

import orjson

FOLD_WINDOW_S = 60.0
"""Seconds a repeated message stays folded before its count is written out."""

PROGRESS = "phonon_cli.progress"
"""The logger of the periodic progress lines (``--stats-interval``)."""

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line, with the record's ``extra`` fields beside the message."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class Folding(logging.Filter):
    """Lets the first of identical warnings and errors through and counts the rest."""

    def __init__(self, emit: Callable[[logging.LogRecord], None]) -> None:
        super().__init__()
        self._emit = emit
        self._last: tuple[int, str] | None = None
        self._since = 0.0
        self._repeats = 0
        self._record: logging.LogRecord | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            self.flush()
            return True
        key = (record.levelno, record.getMessage())
        now = time.monotonic()
        if key == self._last and now - self._since < FOLD_WINDOW_S:
            self._repeats += 1
            return False
        self.flush()
        self._last, self._since, self._record = key, now, record
        return True

    def flush(self) -> None:
        """Write how many repeats were folded, if any."""
        if self._repeats and self._record is not None:
            record = logging.makeLogRecord(self._record.__dict__)
            n, self._repeats = self._repeats, 0
            record.msg, record.args = f"... and {n:,} more like it: %s", (record.getMessage(),)
            record.repeats = n
            self._emit(record)
        self._last = None


class FoldingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self.folding = Folding(super().emit)
        self.addFilter(self.folding)

    def close(self) -> None:
        self.folding.flush()
        super().close()


def setup(verbose: int = 0, quiet: bool = False, fmt: str = "text") -> None:
    level = (
        logging.ERROR
        if quiet
        else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    )
    handler = FoldingHandler(sys.stderr)
    text = logging.Formatter("phonon: %(levelname)s: %(message)s")
    handler.setFormatter(JsonFormatter() if fmt == "json" else text)
    root = logging.getLogger("phonon_cli")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    progress = logging.getLogger(PROGRESS)
    progress.setLevel(logging.ERROR if quiet else logging.INFO)
    if fmt != "json":  # the text form needs no level: it is not a complaint
        plain = FoldingHandler(sys.stderr)
        plain.setFormatter(logging.Formatter("phonon: %(message)s"))
        progress.handlers[:] = [plain]
        progress.propagate = False
    else:
        progress.handlers[:] = []
        progress.propagate = True


def progress_logger(interval_s: float) -> Callable[[str], None]:
    """A progress callback that logs at most one line every ``interval_s`` seconds:
    for stderr that is not a terminal (a service's journal, a log file), where a
    redrawn line would be noise and silence until the end is worse."""
    log = logging.getLogger(PROGRESS)
    last = [time.monotonic()]

    def show(line: str) -> None:
        now = time.monotonic()
        if now - last[0] >= interval_s:
            last[0] = now
            log.info("progress: %s", line)

    return show
