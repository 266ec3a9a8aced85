"""No password printed or stored: every URL form, in messages, in ``status``, and in
the recipes that partials leave in Redis (real processes, real Redis, real PostgreSQL)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from phonon_cli.store.connection import redact
from phonon_cli.store.keys import Keys

SECRET = "s3cret"


@pytest.fixture
def protected(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A private redis-server that wants a password: (unix socket, TCP port)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sock = tmp_path / "r.sock"
    args = ["--port", str(port), "--bind", "127.0.0.1", "--unixsocket", str(sock)]
    args += ["--requirepass", SECRET, "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(unix_socket_path=str(sock), password=SECRET).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield str(sock), port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def phonon(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "phonon_cli", *args]
    return subprocess.run(cmd, input=stdin.decode(), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:s3cret@host:6380/0", "redis://user:***@host:6380/0"),
        ("redis://:s3cret@host/0", "redis://:***@host/0"),
        ("rediss://u:s3cret@host:6380", "rediss://u:***@host:6380"),
        ("redis://host/0?password=s3cret&db=1", "redis://host/0?password=***&db=1"),
        ("unix://:s3cret@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        ("redis+unix://:s3cret@/run/r.sock", "redis+unix://:***@/run/r.sock"),
        ("unix:///run/r.sock?password=s3cret", "unix:///run/r.sock?password=***"),
        ("redis://u:s3cret@host:notaport/0", "redis://u:***@host:notaport/0"),
        ("redis://u:p@s3cret/x@host/0", "redis://u:***@host/0"),
        (
            "postgresql://u@h/db?password=s3cret&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=require",
        ),
        ("host=h password=s3cret dbname=x", "host=h password=*** dbname=x"),
        ("host=h password='s3 cret' dbname=x", "host=h password=*** dbname=x"),
        ("redis://host:6379/0", "redis://host:6379/0"),
    ],
)
def test_redact_every_form(url: str, shown: str) -> None:
    assert redact(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "redis://admin:s3cret@127.0.0.1:1/0",
        "rediss://admin:s3cret@127.0.0.1:1/0",
        "redis://127.0.0.1:1/0?password=s3cret",
        "unix://:s3cret@/nonexistent/phonon.sock",
        "unix:///nonexistent/phonon.sock?password=s3cret",
        "redis+unix://:s3cret@/nonexistent/phonon.sock",
        "redis://admin:s3cret@127.0.0.1:notaport/0",
    ],
)
def test_an_unreachable_store_is_named_without_its_password(url: str) -> None:
    for command in (["status"], ["flush", "--all"]):
        r = phonon("--redis-url", url, *command)
        assert r.returncode == 3, r.stderr
        assert SECRET not in r.stdout + r.stderr and "Traceback" not in r.stderr
        assert "***" in r.stderr


def test_status_and_errors_on_a_protected_store(protected: tuple[str, int]) -> None:
    sock, port = protected
    good = [
        f"unix://:{SECRET}@{sock}",
        f"unix://{sock}?password={SECRET}",
        f"redis://:{SECRET}@127.0.0.1:{port}/0",
        f"redis://default:{SECRET}@127.0.0.1:{port}/0",
        f"redis://127.0.0.1:{port}/0?password={SECRET}",
    ]
    for url in good:
        r = phonon("--redis-url", url, "status")
        assert r.returncode == 0, r.stderr
        assert SECRET not in r.stdout + r.stderr and f"store: {redact(url)}" in r.stdout
        r = phonon("--redis-url", url, "status", "--json")
        assert orjson.loads(r.stdout)["store"] == redact(url)
    wrong = f"redis://default:not-{SECRET}@127.0.0.1:{port}/0"
    r = phonon("--redis-url", wrong, "status")
    assert r.returncode == 3 and SECRET not in r.stderr and "cannot authenticate" in r.stderr


def everything_stored(client: redis.Redis, namespace: str) -> str:
    """Every key and value of the namespace, as text (DUMP may compress a value)."""
    out = []
    for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        kind = client.type(key)
        value = {
            "string": client.get,
            "hash": client.hgetall,
            "list": lambda k: client.lrange(k, 0, -1),
            "set": client.smembers,
            "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
            "stream": lambda k: client.xrange(k),
        }[kind](key)
        out.append(f"{key} {value}")
    return "\n".join(out)


CONFIG = """
[[routes]]
update = "phonon_cli.sinks.sql:Counter"
id = "{k}"
collection = "t"
database = "DB"
spec = { k = "{k}" }
doc = { n = "{n}" }
"""


@pytest.mark.postgres
def test_recipes_name_the_database_without_its_password(
    redis_url, namespace, tmp_path, postgres_url, client, helpers
) -> None:
    """A partial left by a worker that died is executed by ``flush -c``, which takes the
    database URL (password and all) from its own config; Redis never held it. A config
    that does not know the database leaves the partial where it is, and says so."""
    import psycopg

    assert "postgres@" in postgres_url
    url = postgres_url.replace("postgres@", f"postgres:{SECRET}@", 1)
    cfg = tmp_path / "phonon.toml"
    cfg.write_text(CONFIG.replace("DB", url))
    other = tmp_path / "other.toml"
    other.write_text(CONFIG.replace("DB", f"sqlite:///{tmp_path / 'other.db'}"))
    holder = helpers.start_worker(redis_url, namespace, cfg, "--dead-letter", str(tmp_path / "d"))
    try:
        assert holder.stdin is not None
        holder.stdin.write(b'{"k": "a", "n": 1}\n')
        holder.stdin.flush()
        keys = Keys(namespace)
        nodes = keys.resource("t:a").nodes
        helpers.wait_for(lambda: client.hlen(nodes) == 1, what="the holder to take the key")
        cmd = [*helpers.phonon_command(redis_url, namespace), "run", "-c", str(cfg)]
        lines = b'{"k": "a", "n": 5}\n{"k": "a", "n": 2}\n'
        r = subprocess.run(cmd, input=lines, capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        stored = everything_stored(client, namespace)
        assert "t:a" in stored and SECRET not in stored
        meta = client.hget(keys.resource("t:a").meta, "recipe")
        assert orjson.loads(meta)["database"] == redact(url)
    finally:
        holder.kill()  # its own event dies with it: stdin cannot replay
        holder.communicate(timeout=30)
    base = [*helpers.phonon_command(redis_url, namespace)]
    helpers.wait_for(
        lambda: client.exists(keys.alive(client.hkeys(nodes)[0])) == 0,
        what="the holder to count as dead",
    )
    r = subprocess.run([*base, "flush", "-c", str(other), "--all"], capture_output=True, text=True)
    assert "t:a" in r.stdout and "not in" in r.stderr and SECRET not in r.stdout + r.stderr
    assert client.exists(keys.resource("t:a").partials)
    r = subprocess.run([*base, "flush", "-c", str(cfg), "--all"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "executed 1 orphaned partial(s)" in r.stderr and SECRET not in r.stdout + r.stderr
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT k, n FROM t").fetchall() == [("a", 7)]
    assert helpers.namespace_keys(client, namespace) == []
