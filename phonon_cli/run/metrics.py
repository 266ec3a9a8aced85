"""``phonon run --metrics ADDR``: Prometheus metrics and a health check over HTTP.

What a worker serves comes from three places, each read when Prometheus scrapes:

- the run loop's counts (``RunStats``, per source ``SourceTally``): plain integers
  the loop adds to once per chunk, so the event path pays nothing for metrics;
- ``telemetry.REGISTRY``: prometheus_client counters and histograms the library
  observes once per batch (sink writes, Redis round trips, keys by route);
- the store: the run's sources' lag, and the namespace's quarantined keys.

With ``--workers`` each worker sends the first two, as samples (``dump``), with
the report it writes to the parent every second; the parent serves their sum
(``added_up``): counters and histogram buckets add up across workers, so one
endpoint shows the whole run. The text format is prometheus_client's; the
server is the standard library's, because it also answers ``/healthz``: 200
while the worker's heartbeat is current (with ``--workers``, while every worker
is alive), 503 otherwise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from .. import defaults, telemetry
from ..exceptions import ConfigError
from ..ops import quarantine
from ..ops.status import Status

if TYPE_CHECKING:
    from .loop import Runner

log = logging.getLogger(__name__)

Families = Callable[[], Iterable[Metric]]
"""What a server shows besides the store's figures: a worker's, or the workers' sum."""

Dumped = list[list[Any]]
"""Metric families as JSON: ``[[name, type, help, [[sample, labels, value], ...]], ...]``."""


def worker_families(runner: Runner) -> list[Metric]:
    """This worker's metrics: the loop's counts and the library's (``telemetry``)."""
    stats, figures = runner.stats, runner.stats.figures(runner.cache.size())
    read = CounterMetricFamily(
        "phonon_events_read",
        "Lines read from a source (events, bad lines and all; blank lines are not counted).",
        labels=["source"],
    )
    routed = CounterMetricFamily(
        "phonon_routed",
        "Events merged into a route's keys (an event two routes take counts in each).",
        labels=["source", "route"],
    )
    unmatched = CounterMetricFamily(
        "phonon_unmatched",
        "Events that matched no route (counted, then skipped).",
        labels=["source"],
    )
    dead = CounterMetricFamily(
        "phonon_dead_lettered",
        "Lines written to the dead-letter file, with their reason.",
        labels=["source"],
    )
    for source, tally in list(runner.tallies.items()):
        read.add_metric([source], tally.read)
        unmatched.add_metric([source], tally.unmatched)
        dead.add_metric([source], tally.dead_lettered)
        for name, n in zip(runner.route_names, tally.routed):
            routed.add_metric([source, name], n)
    nulls = CounterMetricFamily(
        "phonon_nulls_skipped", "Null field values skipped (SQL's rule).", labels=["route"]
    )
    for route, n in stats.nulls_skipped.items():
        nulls.add_metric([route], n)
    return [
        read,
        routed,
        unmatched,
        dead,
        CounterMetricFamily(
            "phonon_execute_failures",
            "Aggregates whose write failed and were kept in Redis.",
            value=figures["execute_failures"],
        ),
        GaugeMetricFamily(
            "phonon_cache_entries", "Keys cached in the workers' memory.", value=figures["entries"]
        ),
        nulls,
        *telemetry.REGISTRY.collect(),
    ]


def dump(families: Iterable[Metric]) -> Dumped:
    """Families as JSON for a worker's report. ``_created`` samples are left out: a
    sum of creation times means nothing."""
    return [
        [
            m.name,
            m.type,
            m.documentation,
            [[s.name, s.labels, s.value] for s in m.samples if not s.name.endswith("_created")],
        ]
        for m in families
    ]


def added_up(reports: Iterable[Dumped]) -> list[Metric]:
    """The workers' families, every sample (counter, gauge, histogram bucket, count and
    sum) summed over the workers that have it, in the order they were first seen."""
    families: dict[str, Metric] = {}
    totals: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
    for report in reports:
        for name, kind, text, samples in report:
            if name not in families:
                families[name] = Metric(name, text, kind)
            for sample, labels, value in samples:
                key = (name, sample, tuple(labels.items()))
                totals[key] = totals.get(key, 0.0) + value
    for (name, sample, labels), value in totals.items():
        families[name].add_sample(sample, dict(labels), value)
    return list(families.values())


class StoreFigures:
    """What Redis says: the lag of the run's own sources (their offsets read by name,
    no SCAN), and the namespace's quarantined keys.

    Counting quarantined keys takes a SCAN of the whole namespace, which grows with
    every key in it; so the count is kept for ``QUARANTINE_COUNT_TTL_S`` and taken
    again sooner only when this run quarantined more (``quarantined_here``). A count
    kept in Redis by the quarantine scripts would be exact at every scrape, but each
    script touches one resource's keys only (one hash slot, for Redis Cluster), and
    ``quarantine drop`` and ``retry`` would each have to keep it right too.
    """

    def __init__(
        self,
        status: Status,
        sources: Sequence[tuple[str, str]],
        quarantined_here: Callable[[], int],
    ) -> None:
        self.status = status
        self.sources = list(sources)
        self.quarantined_here = quarantined_here
        self._held: int | None = None
        self._counted_at = 0.0
        self._here = 0

    def collect(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "phonon_source_lag",
            "Events between the committed offset and the end of a partition.",
            labels=["group", "source", "partition"],
        )
        try:
            for row in self.status.sources(self.sources) if self.sources else ():
                if row["lag"] is not None:
                    lag.add_metric([row["group"], row["source"], row["partition"]], row["lag"])
            held = self._quarantined()
        except redis.RedisError as e:
            log.debug("metrics: the store did not answer: %s", e)
            return
        yield lag
        yield GaugeMetricFamily(
            "phonon_quarantined_keys",
            "Aggregates set aside because their write can never succeed (phonon quarantine).",
            value=held,
        )

    def _quarantined(self) -> int:
        now, here = time.monotonic(), self.quarantined_here()
        if (
            self._held is None
            or here != self._here
            or now - self._counted_at >= defaults.QUARANTINE_COUNT_TTL_S
        ):
            self._held = quarantine.count(self.status.client, self.status.keys)
            self._counted_at, self._here = now, here
        return self._held


class RunCollector(Collector):
    """The run's metrics, read at each scrape: ``families`` and the store's figures."""

    def __init__(self, families: Families, store: StoreFigures | None) -> None:
        self.families = families
        self.store = store

    def collect(self) -> Iterator[Metric]:
        yield from self.families()
        if self.store is not None:
            yield from self.store.collect()


def parse_address(addr: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT``; the host defaults to 127.0.0.1 (metrics are
    not for the whole network unless asked, e.g. ``0.0.0.0:9464``).

    Raises:
        ConfigError: not an address with a port.
    """
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--metrics {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host, int(port)


class MetricsServer:
    """Serves ``/metrics`` and ``/healthz`` on a daemon thread until ``close``."""

    def __init__(
        self,
        addr: str,
        families: Families,
        healthy: Callable[[], bool],
        store: StoreFigures | None = None,
    ) -> None:
        host, port = parse_address(addr)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(RunCollector(families, store))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the standard library's name
                path = self.path.split("?")[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif path == "/healthz":
                    ok = healthy()
                    self._send(200 if ok else 503, "text/plain", b"ok\n" if ok else b"stale\n")
                else:
                    self._send(404, "text/plain", b"/metrics or /healthz\n")

            def _send(self, code: int, kind: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("metrics: " + format, *args)

        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise ConfigError(f"--metrics {addr!r}: cannot listen: {e.strerror or e}") from e
        self.server.daemon_threads = True
        self.address = f"{host}:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, name="phonon-metrics", daemon=True
        ).start()
        log.info("metrics on http://%s/metrics", self.address)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
