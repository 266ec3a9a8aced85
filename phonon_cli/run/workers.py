"""``phonon run --workers N``: N worker processes on one machine, one command.

Each worker is a full ``phonon run`` process, a member coordinating through
Redis exactly as separately started workers do: that is what makes it safe, and
what lets a worker die without the others noticing more than a dead process.
Workers are forked from this parent once it has loaded the config and imported
what a worker runs, so a worker starts at once instead of importing everything
again (≈ 0.35 s of CPU each, on the same cores the workers need); the forked
child returns from ``Supervisor.start`` and goes on as ``phonon run`` with a
report pipe. This parent only does what one process must:

- it reads stdin (if ``-`` is a source) and hands out line-aligned chunks, each
  to one worker whose pipe has room, so a slow worker gets fewer;
- it forwards SIGINT/SIGTERM to every worker (the workers are in their own
  session, so a terminal's Ctrl-C reaches them once, through here);
- it adds up the workers' reports (a JSON line each, on a pipe of their own)
  into one progress line and one summary, and picks one exit code.

``file:`` partitions and ``redis-stream:`` entries need nothing from here: the
workers split them as any consumer group does.

Exit code: 0 when every worker exited 0; a worker killed by a signal we did not
send (kill -9) is 1, with a message naming it (the survivors go on, and recover
what it held as they would for any dead process); otherwise the workers' code
when they agree, else 1.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, Any

import orjson

from .. import defaults
from .loop import COUNTS, NULLS

log = logging.getLogger(__name__)

REPORT_FIELDS = (*COUNTS, "entries")
"""What a worker reports (``Report``) and the parent adds up."""

READ_SIZE = 1 << 18
"""Bytes per read of the parent's stdin."""

PIPE_SIZE = 1 << 20
"""Bytes of pipe buffer asked for per worker (Linux), so a worker never starves."""

EXIT_FAILURE = 1
"""The exit code of a run one of whose workers was killed."""


def count_workers(value: str) -> int:
    """``N`` or ``auto`` (the number of cores) as a number of workers.

    Raises:
        ValueError: not a positive integer nor ``auto``.
    """
    if value == "auto":
        return os.cpu_count() or 1
    n = int(value)
    if n < 1:
        raise ValueError("must be at least 1")
    return n


# -- the worker's side ---------------------------------------------------------------------


class Report:
    """A worker's figures, written as one JSON line each time to the parent's pipe."""

    def __init__(self, fd: int) -> None:
        self._file: IO[bytes] = os.fdopen(fd, "wb", buffering=0)
        self._lock = threading.Lock()

    def write(
        self, figures: dict[str, Any], final: bool = False, metrics: list[Any] | None = None
    ) -> None:
        """``metrics``: the worker's metric families (``run.metrics.dump``), for the
        parent's ``--metrics`` endpoint; None when it serves none."""
        nulls = {k: n for k, n in figures.items() if k.startswith(NULLS)}  # one per fields route
        line = orjson.dumps(
            {**{k: figures.get(k, 0) for k in REPORT_FIELDS}, **nulls, "final": final}
            | ({"metrics": metrics} if metrics is not None else {})
        )
        with self._lock:
            try:
                self._file.write(line + b"\n")
            except OSError:  # the parent is gone: nobody to tell
                pass

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass


def watch_parent(on_orphaned: Callable[[], object], interval_s: float = 0.5) -> None:
    """Call ``on_orphaned`` once if the parent dies (kill -9), so a worker started by
    ``--workers`` stops as if told to rather than reading forever for nobody."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        on_orphaned()

    threading.Thread(target=watch, name="phonon-parent-watch", daemon=True).start()


# -- the parent's side ---------------------------------------------------------------------


class Child:
    """A forked worker: the part of ``subprocess.Popen`` the parent uses.

    ``returncode`` as Popen has it: the exit code, or minus the signal that killed
    it. ``poll`` is called from several threads (the main loop, ``/healthz``), so the
    one ``waitpid`` that reaps it is under a lock.
    """

    def __init__(self, pid: int, stdin: int | None) -> None:
        self.pid = pid
        self.stdin = stdin
        """The write end of its stdin pipe (None: it reads no stdin)."""
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        return self._wait(os.WNOHANG)

    def wait(self) -> int:
        code = self._wait(0)
        assert code is not None
        return code

    def _wait(self, flags: int) -> int | None:
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, flags)
                except ChildProcessError:  # reaped elsewhere: nothing more to learn
                    pid, status = self.pid, 0
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode


@dataclass
class Worker:
    index: int
    proc: Child
    reports: int
    """The read end of its report pipe."""
    figures: dict[str, int] = field(default_factory=dict)
    metrics: list[Any] = field(default_factory=list)
    """Its metric families as last reported (``Report.write``); kept after it exits."""
    pending: memoryview | None = None
    """Part of a chunk of stdin written only in part (non-blocking)."""
    fed: bool = True
    """Its stdin pipe is still open."""

    @property
    def stdin_fd(self) -> int:
        assert self.proc.stdin is not None
        return self.proc.stdin


@dataclass
class Outcome:
    """What the workers did together."""

    figures: dict[str, int]
    exit_code: int
    problems: list[str]


class Supervisor:
    """Starts the workers, feeds them stdin, forwards signals, adds up their reports.

    Args:
        count: how many workers.
        feed_stdin: ``-`` is a source: hand stdin out to the workers.
        progress: called with the summed figures every progress interval.
    """

    def __init__(
        self,
        count: int,
        feed_stdin: bool,
        progress: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        self.count = count
        self.feed_stdin = feed_stdin
        self.progress = progress
        self.workers: list[Worker] = []
        self.signals = 0
        self._sent: dict[int, int] = {}
        """pid -> the signal we last sent it (such an exit is not a failure)."""
        self._stop_feeding = threading.Event()
        self._next = 0
        """The worker offered the next chunk first: turn by turn, so small inputs spread."""

    def start(self) -> int | None:
        """Fork the workers. Returns None in this parent, with every worker started; in a
        worker, the descriptor of its report pipe: the caller goes on as that worker.

        Called before any thread is started here (a forked child has only the thread
        that forked it: a lock another thread held would stay locked in it).
        """
        sys.stdout.flush()  # or what is buffered would be written again by every child
        sys.stderr.flush()
        gc.freeze()  # what is loaded now stays: no collection walks it, in any process
        for i in range(self.count):
            report_read, report_write = os.pipe()
            stdin_read, stdin_write = os.pipe() if self.feed_stdin else (-1, -1)
            pid = os.fork()
            if pid == 0:
                self._become_worker(report_read, stdin_read, stdin_write)
                return report_write
            os.close(report_write)
            child = Child(pid, None)
            if self.feed_stdin:
                os.close(stdin_read)
                _grow_pipe(stdin_write)
                os.set_blocking(stdin_write, False)
                child.stdin = stdin_write
            self.workers.append(Worker(i, child, report_read))
        for w in self.workers:
            threading.Thread(
                target=self._read_reports, args=(w,), name=f"phonon-report-{w.index}", daemon=True
            ).start()
        return None

    def _become_worker(self, report_read: int, stdin_read: int, stdin_write: int) -> None:
        """In a forked child: its own session (a terminal's Ctrl-C reaches it once,
        through the parent), the default signal handlers until the worker installs its
        own, its stdin pipe (or /dev/null) as fd 0, and none of the pipes of the workers
        forked before it: a sibling's stdin held open here would never see its end."""
        try:
            os.setsid()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            source = stdin_read if stdin_read >= 0 else os.open(os.devnull, os.O_RDONLY)
            os.dup2(source, 0)
            os.close(source)
            for fd in (report_read, stdin_write):
                if fd >= 0:
                    os.close(fd)
            for w in self.workers:
                os.close(w.reports)
                if w.proc.stdin is not None:
                    os.close(w.proc.stdin)
            self.workers.clear()
        except BaseException:  # never back into the parent's code
            os._exit(EXIT_FAILURE)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Forward to every worker: the first is a warm stop, the second a fast one."""
        self.signals += 1
        self._stop_feeding.set()
        for w in self.workers:
            if w.proc.poll() is None:
                self._sent[w.proc.pid] = signum
                try:
                    os.kill(w.proc.pid, signum)
                except ProcessLookupError:
                    pass

    def run(self) -> Outcome:
        """Feed, wait for every worker, and return what they did together."""
        feeder = None
        if self.feed_stdin:
            feeder = threading.Thread(target=self._feed, name="phonon-feed", daemon=True)
            feeder.start()
        next_progress = time.monotonic() + defaults.PROGRESS_INTERVAL_S
        while any(w.proc.poll() is None for w in self.workers):
            time.sleep(0.05)
            if self.progress is not None and time.monotonic() >= next_progress:
                self.progress(self.figures())
                next_progress = time.monotonic() + defaults.PROGRESS_INTERVAL_S
        self._stop_feeding.set()
        return self._outcome()

    def all_alive(self) -> bool:
        """Every worker still running (``/healthz`` of a ``--workers`` run)."""
        return all(w.proc.poll() is None for w in self.workers)

    def reported_metrics(self) -> list[list[Any]]:
        """Every worker's metric families as it last reported them, for the parent's
        ``--metrics`` (``run.metrics.added_up``). A worker that has exited keeps its
        counters (what it did stays done) but not its gauges: a worker killed with
        kill -9 holds no cache entries any more, whatever it last said."""
        return [
            w.metrics if w.proc.poll() is None else [f for f in w.metrics if f[1] != "gauge"]
            for w in self.workers
        ]

    def figures(self) -> dict[str, int]:
        """The workers' figures added up; ``entries`` (a gauge) only over the living."""
        names = {k for w in self.workers for k in w.figures if k.startswith(NULLS)}
        totals = {
            k: sum(w.figures.get(k, 0) for w in self.workers) for k in (*REPORT_FIELDS, *names)
        }
        totals["entries"] = sum(
            w.figures.get("entries", 0) for w in self.workers if w.proc.poll() is None
        )
        return totals

    def _outcome(self) -> Outcome:
        problems, codes = [], []
        for w in self.workers:
            code = w.proc.wait()
            for _ in range(100):  # its last report may still be on the way
                if w.figures.get("final") or w.reports < 0:
                    break
                time.sleep(0.01)
            if code < 0 and self._sent.get(w.proc.pid) != -code:
                name = _signal_name(-code)
                problems.append(
                    f"worker {w.index} (pid {w.proc.pid}) was killed by {name}; the others "
                    "went on and recover what it held in Redis (what it had read from stdin "
                    "and not yet deposited is lost; file and stream sources replay it)"
                )
                codes.append(EXIT_FAILURE)
            elif code < 0:
                codes.append(0)  # it died of the signal we forwarded: as asked
            else:
                codes.append(code)
        failed = {c for c in codes if c}
        exit_code = 0 if not failed else (failed.pop() if len(failed) == 1 else 1)
        return Outcome(self.figures(), exit_code, problems)

    def _read_reports(self, w: Worker) -> None:
        with os.fdopen(w.reports, "rb") as f:
            for line in f:
                try:
                    figures = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                w.metrics = figures.pop("metrics", w.metrics)
                w.figures = figures
        w.reports = -1

    # -- stdin -----------------------------------------------------------------------------

    def _feed(self) -> None:
        """Hand stdin out in chunks of whole lines, each to a worker with room for it."""
        stdin = sys.stdin.buffer
        read = getattr(stdin, "read1", stdin.read)
        keep = defaults.DEAD_LETTER_KEEP_BYTES
        rest = b""
        try:
            while not self._stop_feeding.is_set():
                data = read(READ_SIZE)
                if not data:
                    break
                data = rest + data
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    # No line end yet. A line over the limit is dead-lettered by the
                    # worker that gets it, with the bytes it keeps: past those, the
                    # line reaches it cut (and marked truncated), not held here whole.
                    rest = data if len(data) <= keep else data[: keep + 1]
                    continue
                rest = data[cut:]
                if not self._hand_out(data[:cut]):
                    return
            if rest and not self._stop_feeding.is_set():
                self._hand_out(rest + b"\n")
            self._flush_pending()
        finally:
            for w in self.workers:
                self._close_stdin(w)

    def _hand_out(self, chunk: bytes) -> bool:
        """Write ``chunk`` to one worker; False when no worker is left to take it."""
        while not self._stop_feeding.is_set():
            fed = [w for w in self.workers if w.fed]
            if not fed:
                return False
            start = self._next % len(fed)
            for w in fed[start:] + fed[:start]:
                if w.pending is None and self._write(w, memoryview(chunk)):
                    self._next = start + 1
                    return True
            self._wait_writable(fed)
        return False

    def _flush_pending(self) -> None:
        while not self._stop_feeding.is_set():
            busy = [w for w in self.workers if w.fed and w.pending is not None]
            if not busy:
                return
            self._wait_writable(busy)

    def _wait_writable(self, workers: list[Worker]) -> None:
        """Wait until a pipe has room, and go on writing what is pending there."""
        by_fd = {w.stdin_fd: w for w in workers}
        _, ready, _ = select.select([], list(by_fd), [], 0.2)
        for fd in ready:
            w = by_fd[fd]
            if w.pending is not None:
                self._write(w, w.pending)

    def _write(self, w: Worker, data: memoryview) -> bool:
        """Write what the pipe takes now; the rest stays pending for this worker (a
        line must not be split between workers). True if the worker took any of it."""
        try:
            n = os.write(w.stdin_fd, data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.EBADF):
                raise
            log.warning("worker %d stopped reading its input", w.index)
            self._close_stdin(w)
            return False
        if n == 0:
            return False
        w.pending = data[n:] if n < len(data) else None
        return True

    def _close_stdin(self, w: Worker) -> None:
        w.fed = False
        w.pending = None
        fd, w.proc.stdin = w.proc.stdin, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def _grow_pipe(fd: int) -> None:
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is not None:
        try:
            fcntl.fcntl(fd, set_size, PIPE_SIZE)
        except OSError:
            pass  # a smaller pipe only means more wake-ups


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
