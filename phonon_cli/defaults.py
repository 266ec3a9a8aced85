"""Every tunable, with its unit. Names carry the unit too."""

from __future__ import annotations

NAMESPACE = "phonon"
"""Prefix of every Redis key."""

HOME = ".phonon"
"""Directory of the embedded Redis server (socket, data file), unless PHONON_HOME says."""

HEARTBEAT_INTERVAL_S = 10.0
"""Seconds between heartbeats. A process silent for three intervals counts as dead."""

DEAD_AFTER_HEARTBEATS = 3
"""Missed heartbeats after which a process counts as dead."""

LOCK_TTL_MS = 30_000
"""Milliseconds after which a lock whose owner vanished expires."""

LOCK_TIMEOUT_S = 10.0
"""Seconds a blocking lock waits before raising ``AlreadyLocked``."""

LOCK_POLL_S = 0.005
"""First wait between attempts on a contended lock, in seconds (doubles up to 0.1)."""

SOFT_SESSION_S = 15 * 60.0
"""Seconds a key may stay idle in the cache before its session ends."""

HARD_SESSION_S = 30 * 60.0
"""Seconds since a key's first event after which its session ends regardless."""

MAX_ENTRIES = 10_000
"""Keys one worker's LRU cache holds."""

BATCH_MAX_KEYS = 1_000
"""Keys per batched acquire/release script call."""

BATCH_MAX_AGE_S = 0.05
"""Seconds a batch may wait before it is sent, even if not full."""

EXECUTE_ATTEMPTS = 3
"""Attempts at an ``execute`` before its aggregate is cached back in Redis."""

EXECUTE_BACKOFF_S = 0.2
"""Seconds before the first retry of a failed ``execute``; doubles each attempt."""

RECOVERY_LOCK_TTL_S = 60
"""Seconds the recovery maintenance lock lives if its holder dies mid-recovery."""

SUCCESSOR_TTL_MS = 3_600_000
"""How long a process that started over under a new id is found from its old one
(``Keys.successor``), and one that survivors declared dead is known as such
(``Keys.declared_dead_once``): longer than any ``flush --wait`` waits."""

APPLIED_RETENTION_S = 7 * 24 * 3600.0
"""Seconds a SQL sink remembers an execution id (``phonon_applied``): a set of
partials executed again later than that, by a process paused for longer, would
be written twice."""

STORE_TIMEOUT_S = 60.0
"""Seconds a worker keeps retrying a store it cannot reach before the run ends (exit 1)."""

CONNECT_ATTEMPTS = 3
"""Attempts to reach Redis before giving up with exit code 3."""

EMBEDDED_START_TIMEOUT_S = 10.0
"""Seconds to wait for the embedded Redis server to accept connections."""

MAX_LINE_BYTES = 1 << 20
"""Bytes in one event line beyond which it is dead-lettered as too long
(``phonon run --max-line-bytes``)."""

DEAD_LETTER_KEEP_BYTES = 64 << 20
"""Bytes of one rejected line the dead-letter file keeps; a longer line is cut
there and marked ``truncated`` (memory for one line, not a whole input)."""

PURGE_INTERVAL_S = 1.0
"""Seconds between scans of the cache for expired sessions."""

COMMIT_INTERVAL_S = 0.2
"""Seconds between source offset commits (each scans the cache for the watermark)."""

STOP_GRACE_S = 1.0
"""Seconds a stopping run keeps handling what its sources had already queued."""

STATS_INTERVAL_S = 10.0
"""Seconds between progress lines in the log when stderr is not a terminal
(``phonon run --stats-interval``)."""

METRICS_STORE_TIMEOUT_S = 1.0
"""Seconds a ``--metrics`` scrape waits for the store (the lag, the quarantined count)
before it answers without those figures."""

QUARANTINE_COUNT_TTL_S = 30.0
"""Seconds ``--metrics`` keeps its count of quarantined keys (a SCAN of the namespace)
before counting again; sooner when the run itself quarantined more."""

PROGRESS_INTERVAL_S = 0.5
"""Seconds between redraws of the progress line (when stderr is a terminal)."""

QUEUE_CHUNKS = 64
"""Chunks of lines buffered between the source threads and the run loop."""

GC_GEN0_THRESHOLD = 50_000
"""Allocations between two young-generation collections while a run goes (Python's
default is 700). A run allocates an update, its dicts and its batch entries per
key, so the default collected every few keys and, every few hundred collections,
scanned every cached update: a fifth of the CPU at low locality. What a run keeps
holds no reference cycles, so collecting seldom frees as much."""

CLUSTER_FAILOVER_WAIT_S = 20.0
"""Seconds a batch on a Redis Cluster waits for a node that cannot be reached to be
replaced (a replica promoted) before the run gives up on the store."""
