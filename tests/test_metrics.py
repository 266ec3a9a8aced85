"""``phonon run --metrics``: the series by source, route, sink and batch, scraped from a
real run (one worker, and two behind one endpoint), with exact values where the
input makes them exact."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from phonon_cli import defaults

CONFIG = """
[[routes]]
when = { kind = ["a"] }
update = "phonon_cli.sinks.jsonl:Lines"
id = "{k}"
database = "OUT"
doc = { n = 1 }

[[routes]]
when = { kind = ["b"] }
update = "phonon_cli.sinks.sql:Counter"
id = "{k}"
collection = "t"
database = "sqlite:///DB"
spec = { k = "{k}" }
doc = { "{c}" = 1 }
"""

LINES = "phonon_cli.sinks.jsonl:Lines"
COUNTER = "phonon_cli.sinks.sql:Counter"
POISON_COLUMNS = 2_100
"""More than SQLite's 2,000 columns: the key "bad" can never be written (quarantined)."""


def events() -> bytes:
    """200 events for routes[0] (20 keys), 100 + the poison key's for routes[1] (10 + 1
    keys), 5 unmatched, one line that is not JSON."""
    out = [{"kind": "a", "k": f"a{i % 20}"} for i in range(200)]
    out += [{"kind": "b", "k": f"b{i % 10}", "c": "n"} for i in range(100)]
    out += [{"kind": "b", "k": "bad", "c": f"c{j}"} for j in range(POISON_COLUMNS)]
    out += [{"kind": "z"}] * 5
    return b"".join(orjson.dumps(e) + b"\n" for e in out) + b"not json\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_serving(
    helpers: object, url: str, namespace: str, cfg: Path, port: int, workers: str, *args: str
) -> tuple[subprocess.Popen[bytes], int]:
    """``phonon run --metrics 127.0.0.1:PORT --workers N`` reading stdin from a pipe:
    the run and the pipe's write end (closing it ends the run)."""
    read, write = os.pipe()
    proc = subprocess.Popen(
        [
            *helpers.phonon_command(url, namespace),  # type: ignore[attr-defined]
            "run",
            "-c",
            str(cfg),
            "--metrics",
            f"127.0.0.1:{port}",
            "--workers",
            workers,
            *args,
        ],
        stdin=read,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    os.close(read)
    return proc, write


def fetch(url: str) -> tuple[int, str]:
    """The endpoint's status and body; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the endpoint, parsed by prometheus_client's own parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(fetch(url)[1])
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str):
    """The sum of ``name``'s samples whose labels include ``labels``; None if none has."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    return sum(found) if found else None


@pytest.mark.parametrize("workers", ["1", "2"])
def test_metrics_by_source_route_sink_and_batch_during_a_run(
    tmp_path: Path, redis_url: str, namespace: str, helpers: object, workers: str
) -> None:
    out, db = tmp_path / "out.jsonl", tmp_path / "t.db"
    cfg = tmp_path / "phonon.toml"
    cfg.write_text(CONFIG.replace("OUT", str(out)).replace("DB", str(db)))
    port = free_port()
    proc, write = start_serving(
        helpers, redis_url, namespace, cfg, port, workers,
        "--soft-session", "1s", "--dead-letter", str(tmp_path / "dead.jsonl"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    wait_for = helpers.wait_for  # type: ignore[attr-defined]
    try:
        os.write(write, events())
        expected = {
            ("phonon_events_read_total", ()): 200 + 100 + POISON_COLUMNS + 5 + 1,
            ("phonon_routed_total", (("route", "routes[0]"),)): 200,
            ("phonon_routed_total", (("route", "routes[1]"),)): 100 + POISON_COLUMNS,
            ("phonon_unmatched_total", ()): 5,
            ("phonon_dead_lettered_total", ()): 1,
            # every key's session ends after 1 s idle: executed once (the poison key
            # is not: it is quarantined after its attempts, each a failure counted)
            ("phonon_keys_executed_total", (("route", "routes[0]"),)): 20,
            ("phonon_keys_executed_total", (("route", "routes[1]"),)): 10,
            ("phonon_sink_write_failures_total", (("sink", COUNTER),)): defaults.EXECUTE_ATTEMPTS,
            ("phonon_quarantined_keys", ()): 1,
        }

        def moved() -> bool:
            samples = scrape(url)
            return all(
                value(samples, name, source="-", **dict(labels)) == n
                if name.startswith(
                    ("phonon_events", "phonon_routed", "phonon_unmatched", "phonon_dead")
                )  # fmt: skip
                else value(samples, name, **dict(labels)) == n
                for (name, labels), n in expected.items()
            )

        wait_for(moved, timeout_s=60, what=f"every series to reach {expected}")
        samples = scrape(url)
        # the jsonl sink's writes are timed, in buckets that add up to the count
        writes = value(samples, "phonon_sink_write_seconds_count", sink=LINES)
        assert writes is not None and writes >= 1
        every = value(samples, "phonon_sink_write_seconds_bucket", sink=LINES, le="+Inf")
        assert every == writes
        # batches of scripts: round trips counted by op, with their latency
        trips = value(samples, "phonon_store_batch_seconds_count", op="release")
        assert trips is not None and trips >= 1
        assert value(samples, "phonon_store_batch_seconds_bucket", op="release", le="+Inf") == trips
        assert (value(samples, "phonon_store_batch_seconds_sum", op="release") or 0) > 0
        assert (value(samples, "phonon_store_batch_seconds_count", op="acquire") or 0) >= 1
        assert (value(samples, "phonon_store_batch_seconds_count", op="quarantine") or 0) >= 1
        # the output file holds what the metric says was written there
        assert len(out.read_bytes().splitlines()) == 20
    finally:
        os.close(write)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert b"keys executed 30," in err, err


LINES_TOML = """\
[[routes]]
update = "phonon_cli.sinks.jsonl:Lines"
id = "{a}"
doc = { n = "{n}" }
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_metrics_move_during_a_run_and_healthz_answers(
    tmp_path: Path, redis_url: str, helpers: object, workers: str
) -> None:
    port = free_port()
    cfg = tmp_path / "lines.toml"
    cfg.write_text(LINES_TOML)
    proc, write = start_serving(helpers, redis_url, f"m{port}", cfg, port, workers)
    base = f"http://127.0.0.1:{port}"
    wait_for = helpers.wait_for  # type: ignore[attr-defined]
    os.write(write, b"".join(b'{"a": %d, "n": 1}\n' % (i % 50) for i in range(300)))
    wait_for(
        lambda: value(scrape(f"{base}/metrics"), "phonon_events_read_total") == 300,
        timeout_s=30,
        what="the counter to reach 300",
    )
    assert fetch(f"{base}/healthz") == (200, "ok\n")
    os.write(write, b'{"a": 1, "n": 1}\nnot json\n')
    wait_for(
        lambda: value(scrape(f"{base}/metrics"), "phonon_dead_lettered_total") == 1,
        timeout_s=30,
        what="the dead letter counted",
    )
    samples = scrape(f"{base}/metrics")
    assert value(samples, "phonon_events_read_total") == 302
    assert value(samples, "phonon_quarantined_keys") == 0  # read from the store
    entries = value(samples, "phonon_cache_entries")  # a key may be cached in every worker
    assert entries is not None and 50 <= entries <= 50 * int(workers)
    os.close(write)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert fetch(f"{base}/metrics")[0] == 0  # closed with the run


def test_workers_histograms_and_counters_add_up_sample_by_sample() -> None:
    """What a --workers parent serves: each worker's samples summed, buckets included."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from phonon_cli.run.metrics import added_up, dump

    dumps = []
    for observed in ([0.001, 0.2], [0.3]):
        registry = CollectorRegistry()
        h = Histogram("h_seconds", "h", ["op"], buckets=(0.01, 0.25, 1), registry=registry)
        c = Counter("c", "c", ["route"], registry=registry)
        for v in observed:
            h.labels("release").observe(v)
            c.labels("routes[0]").inc()
        dumps.append(dump(registry.collect()))
    families = {m.name: m for m in added_up(orjson.loads(orjson.dumps(dumps)))}
    got = {(s.name, s.labels.get("le")): s.value for s in families["h_seconds"].samples}
    assert got == {
        ("h_seconds_bucket", "0.01"): 1,
        ("h_seconds_bucket", "0.25"): 2,
        ("h_seconds_bucket", "1.0"): 3,
        ("h_seconds_bucket", "+Inf"): 3,
        ("h_seconds_count", None): 3,
        ("h_seconds_sum", None): pytest.approx(0.501),
    }
    assert [(s.name, s.value) for s in families["c"].samples] == [("c_total", 3)]


def test_a_worker_that_exited_keeps_its_counters_but_not_its_gauges() -> None:
    """A --workers child killed with kill -9 cached nothing any more: the parent stops
    serving its last ``phonon_cache_entries`` and its gauges, and keeps its counters."""
    import subprocess
    import sys

    from phonon_cli.run.metrics import added_up
    from phonon_cli.run.workers import Supervisor, Worker

    families = [
        ["phonon_x", "counter", "x", [["phonon_x_total", {}, 5.0]]],
        ["phonon_g", "gauge", "g", [["phonon_g", {}, 7.0]]],
    ]
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        supervisor = Supervisor(2, feed_stdin=False)
        supervisor.workers = [
            Worker(0, alive, -1, figures={"entries": 3, "events_read": 10}, metrics=families),
            Worker(1, gone, -1, figures={"entries": 4, "events_read": 20}, metrics=families),
        ]
        figures = supervisor.figures()
        assert (figures["entries"], figures["events_read"]) == (3, 30)
        served = {
            s.name: s.value for m in added_up(supervisor.reported_metrics()) for s in m.samples
        }
        assert served == {"phonon_x_total": 10.0, "phonon_g": 7.0}
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.parametrize("fault", ["paused", "stopped"])
def test_a_scrape_while_the_store_is_away_answers_at_once_with_the_counters(
    tmp_path: Path,
    private_server: object,
    helpers: object,
    fault: str,
    stopped_at_the_end: list[subprocess.Popen[bytes]],
) -> None:
    """The Redis a run uses stops answering (SIGSTOP: a hung server, or a network that
    drops packets) or is stopped (connections refused). A scrape must still answer
    at once with the run's own counters; the figures read from the store (a
    ``file:`` source's lag, read at every scrape; quarantined keys) are served as
    last read or left out, never waited for nor turned into an error page. The run
    waits for the store and, once it is back, ends as usual."""
    server = private_server
    port = free_port()
    cfg = tmp_path / "lines.toml"
    cfg.write_text(LINES_TOML)
    topic = tmp_path / "topic.jsonl"
    topic.write_bytes(b"".join(b'{"a": %d, "n": 1}\n' % (i % 50) for i in range(300)))
    source = ("--source", f"file:{topic}", "--follow", "--soft-session", "0.3s")
    proc, write = start_serving(helpers, server.url, "away", cfg, port, "1", *source)  # type: ignore[attr-defined]
    stopped_at_the_end.append(proc)
    url = f"http://127.0.0.1:{port}/metrics"
    wait_for = helpers.wait_for  # type: ignore[attr-defined]
    try:
        wait_for(
            lambda: (
                value(scrape(url), "phonon_events_read_total") == 300
                and value(scrape(url), "phonon_source_lag") == 0
            ),
            timeout_s=30,
            what="the counter at 300 and the lag read from the store",
        )
        if fault == "paused":
            server.proc.send_signal(signal.SIGSTOP)  # type: ignore[attr-defined]
        else:
            server.stop()  # type: ignore[attr-defined]
        for _ in range(2):  # the second scrape too: nothing waits on a socket left over
            started = time.monotonic()
            code, body = fetch(url)
            took = time.monotonic() - started
            assert code == 200, body
            assert took < 3.0, f"a scrape took {took:.1f}s with the store {fault}"
            samples = {
                (s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(body)
                for s in family.samples
            }
            assert value(samples, "phonon_events_read_total") == 300
            assert value(samples, "phonon_cache_entries") == 0  # every session over (0.3 s)
            assert value(samples, "phonon_source_lag") in (None, 0)
            assert value(samples, "phonon_quarantined_keys") in (None, 0)
        started = time.monotonic()
        assert fetch(url.replace("/metrics", "/healthz"))[0] in (200, 503)
        assert time.monotonic() - started < 3.0
    finally:
        if fault == "paused":
            server.proc.send_signal(signal.SIGCONT)  # type: ignore[attr-defined]
        else:
            server.start()  # type: ignore[attr-defined]
        os.close(write)
    wait_for(
        lambda: value(scrape(url), "phonon_source_lag") == 0,
        timeout_s=30,
        what="the lag read from the store again",
    )
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err


@pytest.fixture
def stopped_at_the_end() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Runs a test started that a failed assertion could leave running (a ``--follow``
    run on a store that is gone would wait for it, then for its workers)."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
