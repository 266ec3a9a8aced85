"""``Lines``: one JSON object per executed key, to stdout or appended to a file.

For piping aggregates into other tools, or for looking at what a config would
write before pointing it at a database. The output is data, so it goes to
stdout (``database = "-"`` or unset); everything else phonon says goes to stderr.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

import orjson

from ..core.update import ConflictFreeUpdate, Failures, Update
from ..exceptions import OutputClosed, SinkError
from ..fields.aggregate import FieldsUpdate

_write_lock = threading.Lock()
_stdout_closed = threading.Event()
"""Set at the first broken pipe on stdout: nothing is written there after it."""
"""One writer at a time in this process: the run loop and the heartbeat thread
(executing recovered partials) must not interleave half-lines."""


def line(update: Update) -> bytes:
    """The JSON line written for an executed update: its ``doc``, or for an
    aggregate of fields the executed ``values`` (name -> value)."""
    body: dict[str, Any] = {"id": update._id, "collection": update.collection, "spec": update.spec}
    if isinstance(update, FieldsUpdate):
        body["values"] = update.values()
    else:
        body["doc"] = update.doc
    try:
        return orjson.dumps(
            body,
            option=orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE,
        )
    except TypeError as e:
        raise SinkError(f"{update.resource}: not JSON: {e}") from e


def _append(path: str, data: bytes) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    # Unbuffered, O_APPEND: each write lands at the end even with other worker
    # processes appending to the same file; loop in case the OS writes part of it.
    with open(path, "ab", buffering=0) as f:
        view = memoryview(data)
        while view:
            view = view[f.write(view) or 0 :]


def _execute_lines(updates: Sequence[Update]) -> Failures:
    """Write each target's lines at once; if that write fails, so did its batch."""
    failures: Failures = []
    targets: dict[str, list[bytes]] = {}
    owners: dict[str, list[Update]] = {}
    for u in updates:
        target = "-" if u.database in (None, "-") else u.database
        try:
            if not isinstance(target, str) or not target:
                raise SinkError(f"{u.resource}: database {target!r} is not '-' or a path")
            data = line(u)
        except SinkError as e:
            failures.append((u, e))
            continue
        targets.setdefault(target, []).append(data)
        owners.setdefault(target, []).append(u)
    for target, lines in targets.items():
        data = b"".join(lines)
        if target == "-" and _stdout_closed.is_set():
            failures += [(u, OutputClosed("stdout is closed")) for u in owners[target]]
            continue
        try:
            with _write_lock:
                if target == "-":
                    # Looked up now, not at import: the CLI and tests swap sys.stdout.
                    sys.stdout.write(data.decode())
                    sys.stdout.flush()
                else:
                    _append(target, data)
        except (OSError, ValueError) as e:
            error = SinkError(f"{'stdout' if target == '-' else target}: cannot write: {e}")
            if target == "-" and isinstance(e, BrokenPipeError):
                _stdout_closed.set()
                # What is left in Python's buffer can never be written: drop it now,
                # or the interpreter's last flush at exit would fail on it again.
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives with the process
                error = OutputClosed(f"stdout is closed ({e})")
            error.__cause__ = e
            failures += [(u, error) for u in owners[target]]
    return failures


def _probe(route: Any) -> str:
    target = route.database
    if target in (None, "-"):
        return "stdout"
    parent = os.path.dirname(os.path.abspath(target)) or "."
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise SinkError(f"{target}: {parent} is not writable")
    return f"appends to {target}"


class _LinesSink:
    """What both line sinks do: a batch is one write per target, ``execute`` is a
    batch of one, and ``check --connect`` looks at the target."""

    @classmethod
    def check_connect(cls, route: Any) -> str | None:
        return _probe(route)

    def execute(self) -> None:
        failures = type(self).execute_many([self])  # type: ignore[list-item]
        if failures:
            raise failures[0][1]

    @classmethod
    def execute_many(cls, updates: Sequence[Update]) -> Failures:
        """Write each target's lines at once; if that write fails, so did its batch."""
        return _execute_lines(updates)


class Lines(_LinesSink, ConflictFreeUpdate):
    """Writes ``{"id", "collection", "spec", "doc"}`` per executed key, one per line.

    ``database`` is ``"-"`` or None for stdout, else a file path (parent
    directories are created). A batch is one write and one flush.
    """


class AggregateLines(_LinesSink, FieldsUpdate):
    """Writes ``{"id", "collection", "spec", "values"}`` per executed key of a route
    with ``fields``: each field's executed value (a set as a sorted list, a mean as
    a number...). ``database`` as for ``Lines``."""
