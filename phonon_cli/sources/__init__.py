"""Where events come from: ``open_source`` turns a ``--source`` value into a source.

The contract (``Source``, ``Chunk``) and the shared reader machinery are in
``base``; each kind of source has its own module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .base import Chunk, Source

if TYPE_CHECKING:
    from ..core.process import Process

__all__ = ["Chunk", "Source", "open_source", "open_sources"]


def open_source(
    spec: str,
    process: Process | None = None,
    *,
    group: str = "phonon",
    follow: bool = False,
    start_from: str = "committed",
) -> Source:
    """The source a ``--source`` value names.

    Args:
        spec: ``-``, ``file:PATH``, ``redis-pubsub:CHANNEL`` or ``redis-stream:KEY``.
        process: this worker; every source but stdin coordinates through its Redis.
        group: the consumer group (committed offsets, partition split, stream group).
        follow: file sources tail their partitions and streams wait for new entries,
            instead of ending at the end of what is there (pub/sub always follows).
        start_from: ``committed`` or ``earliest``, for sources with offsets.

    Raises:
        SourceError: for a kind that is unknown, or a source that cannot be opened.
    """
    from ..exceptions import SourceError
    from .stdin import StdinSource

    if spec == "-":
        return StdinSource()
    kind, _, rest = spec.partition(":")
    if kind not in ("file", "redis-pubsub", "redis-stream"):
        raise SourceError(
            f"unknown source {spec!r}: use '-' (stdin), file:PATH, "
            "redis-pubsub:CHANNEL or redis-stream:KEY"
        )
    if not rest:
        raise SourceError(f"source {spec!r} names no {'path' if kind == 'file' else 'key'}")
    if process is None:
        raise SourceError(f"source {spec!r} needs a process (its Redis connection)")
    if kind == "file":
        from pathlib import Path

        from .files import FileSource

        return FileSource(spec, Path(rest), process, group, follow, start_from)
    if kind == "redis-pubsub":
        from .pubsub import PubSubSource

        return PubSubSource(spec, rest, process, group)
    from .stream import StreamSource

    return StreamSource(spec, rest, process, group, start_from, follow)


def open_sources(
    specs: Sequence[str],
    process: Process,
    *,
    group: str = "phonon",
    follow: bool = False,
    start_from: str = "committed",
    max_line_bytes: int | None = None,
) -> list[Source]:
    """Every ``--source`` of a run. A source named twice would be read twice, so it is refused.
    Lines over ``max_line_bytes`` are rejects (default ``defaults.MAX_LINE_BYTES``).

    Raises:
        SourceError: as ``open_source``, or for a source given twice.
    """
    from ..exceptions import SourceError

    seen = [s for i, s in enumerate(specs) if s in specs[:i]]
    if seen:
        raise SourceError(f"source {seen[0]!r} is given twice")
    opened = [
        open_source(s, process, group=group, follow=follow, start_from=start_from) for s in specs
    ]
    if max_line_bytes is not None:
        for source in opened:
            source.max_line_bytes = max_line_bytes
    return opened
