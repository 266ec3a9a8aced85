"""``phonon run --metrics ADDR``: Prometheus metrics and a health check over HTTP.

The figures are read when Prometheus scrapes, from what the run already counts
(``RunStats``, or with ``--workers`` what every worker last reported to the
parent), so serving metrics costs the event path nothing. The text format is
prometheus_client's; the server is the standard library's, because it also
answers ``/healthz``: 200 while the worker's heartbeat is current (with
``--workers``, while every worker is alive), 503 otherwise.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from ..exceptions import ConfigError
from ..ops import quarantine
from ..ops.status import Status
from .loop import NULLS

log = logging.getLogger(__name__)

COUNTERS = {
    "events_read": "Lines read from the sources (events, bad lines and all).",
    "routed": "Events that matched at least one route.",
    "unmatched": "Events that matched no route (counted, then skipped).",
    "dead_lettered": "Lines written to the dead-letter file, with their reason.",
    "keys_executed": "Aggregates written to their sink (one per key and session).",
    "keys_cached": "Partials deposited in Redis for another holder of the key.",
    "execute_failures": "Aggregates whose write failed and were kept in Redis.",
}


class RunCollector(Collector):
    """The run's figures as Prometheus metrics, read at each scrape."""

    def __init__(self, figures: Callable[[], dict[str, int]], status: Status | None) -> None:
        self.figures = figures
        self.status = status

    def collect(self) -> Iterator[Metric]:
        f = self.figures()
        for name, text in COUNTERS.items():
            yield CounterMetricFamily(f"phonon_{name}", text, value=f.get(name, 0))
        yield GaugeMetricFamily(
            "phonon_cache_entries", "Keys cached in the workers' memory.", value=f.get("entries", 0)
        )
        nulls = CounterMetricFamily(
            "phonon_nulls_skipped", "Null field values skipped (SQL's rule).", labels=["route"]
        )
        for key, n in f.items():
            if key.startswith(NULLS):
                nulls.add_metric([key[len(NULLS) :]], n)
        yield nulls
        if self.status is not None:
            yield from self._from_store(self.status)

    def _from_store(self, status: Status) -> Iterator[Metric]:
        """What the whole namespace's Redis says: lag per partition, quarantined keys."""
        lag = GaugeMetricFamily(
            "phonon_source_lag",
            "Events between the committed offset and the end of a partition.",
            labels=["group", "source", "partition"],
        )
        try:
            for row in status.sources():
                if row["lag"] is not None:
                    lag.add_metric([row["group"], row["source"], row["partition"]], row["lag"])
            held = sum(1 for _ in quarantine.scan(status.client, status.keys))
        except redis.RedisError as e:
            log.debug("metrics: the store did not answer: %s", e)
            return
        yield lag
        yield GaugeMetricFamily(
            "phonon_quarantined_keys",
            "Aggregates set aside because their write can never succeed (phonon quarantine).",
            value=held,
        )


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
        figures: Callable[[], dict[str, int]],
        healthy: Callable[[], bool],
        status: Status | None = None,
    ) -> None:
        host, port = parse_address(addr)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(RunCollector(figures, status))

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
