"""What the run loop counted per source, for ``--metrics`` (``run.metrics``).

Kept apart from ``RunStats`` (the run's totals, which the summary and ``phonon
status`` show) because it is added to once per chunk of lines, from the totals'
change over the chunk, not once per event: the event path stays as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SourceTally:
    """One source's counts. ``routed`` is per route, by its index in the config
    (``routes[i]``): an event two routes take counts once in each."""

    read: int = 0
    unmatched: int = 0
    dead_lettered: int = 0
    routed: list[int] = field(default_factory=list)

    @classmethod
    def for_routes(cls, n: int) -> SourceTally:
        return cls(routed=[0] * n)
