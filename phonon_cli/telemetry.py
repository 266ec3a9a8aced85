"""What the library measures as it works, for ``phonon run --metrics``: prometheus_client
counters and histograms on one registry of this module's own.

They are observed where the work is done (a sink's write in ``core.quarantine``
and ``core.update``, a batch of scripts in ``store.scripts``), once per batch,
never per event: an observe costs about a microsecond, a batch tens of them to
milliseconds. The run loop's per-event figures are plain integers read at each
scrape instead (``run.metrics``).

A registry of our own, not prometheus_client's global one: what a worker reports
to a ``--workers`` parent is exactly this registry, and nothing a user's code
registers globally ends up in it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=False)

SINK_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
"""Upper bounds (seconds) of a sink write's buckets: a small SQLite batch to a locked
database's timeout."""

BATCH_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
"""Upper bounds (seconds) of a Redis batch's buckets: a local socket to a slow network."""

SINK_WRITE_SECONDS = Histogram(
    "phonon_sink_write_seconds",
    "Duration of one call to a sink's execute_many (a batch of aggregates of one class).",
    ["sink"],
    buckets=SINK_BUCKETS_S,
    registry=REGISTRY,
)
SINK_WRITE_FAILURES = Counter(
    "phonon_sink_write_failures",
    "Aggregates whose write failed, per attempt (retried, then cached back or quarantined).",
    ["sink"],
    registry=REGISTRY,
)
STORE_BATCH_SECONDS = Histogram(
    "phonon_store_batch_seconds",
    "Duration of one round trip to Redis with a batch of scripts (its _count: round trips).",
    ["op"],
    buckets=BATCH_BUCKETS_S,
    registry=REGISTRY,
)
KEYS_EXECUTED = Counter(
    "phonon_keys_executed",
    "Aggregates written to their sink (one per key and session).",
    ["route"],
    registry=REGISTRY,
)
KEYS_CACHED = Counter(
    "phonon_keys_cached",
    "Partials deposited in Redis for another holder of the key (or cached back).",
    ["route"],
    registry=REGISTRY,
)


def sink_name(cls: type) -> str:
    """The ``sink`` label: the class's ``module:Qualname``, as a config names it."""
    return f"{cls.__module__}:{cls.__qualname__}"
