"""``phonon run`` end to end: the installed command, real Redis, real databases."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
from base64 import b64decode
from collections import Counter
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).parent.parent


def phonon(
    *args: str,
    redis_url: str | None = None,
    namespace: str | None = None,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, "-m", "phonon_cli"]
    if redis_url:
        cmd += ["--redis-url", redis_url, "--namespace", namespace or "phonon"]
    return subprocess.run(
        [*cmd, *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def events(n: int, keys: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randrange(keys)
        out.append(
            {
                "parent_post_id": k % 17,
                "target_post_id": k,
                "event_type": rng.choice(["clicks", "impressions"]),
            }
        )
    return out


def totals(evs: list[dict]) -> Counter:
    c: Counter = Counter()
    for e in evs:
        c[(e["parent_post_id"], e["target_post_id"], e["event_type"])] += 1
    return c


def as_lines(evs: list[dict]) -> bytes:
    return b"".join(orjson.dumps(e) + b"\n" for e in evs)


def widget_config(
    tmp_path: Path,
    database: str,
    suffix: str = "toml",
    update: str = "phonon_cli.sinks.sql:Counter",
    max_entries: int = 10000,
) -> Path:
    text = (ROOT / "configs" / f"widgets.{suffix}").read_text()
    text = text.replace("sqlite:///widgets.db", database)
    text = text.replace("phonon_cli.sinks.sql:Counter", update)
    text = text.replace("max_entries = 10000", f"max_entries = {max_entries}")
    text = text.replace("max_entries: 10000", f"max_entries: {max_entries}")
    path = tmp_path / f"widgets.{suffix}"
    path.write_text(text)
    return path


def sqlite_totals(path: Path) -> Counter:
    c: Counter = Counter()
    with sqlite3.connect(path) as db:
        cols = [r[1] for r in db.execute("PRAGMA table_info(widgets)")]
        for row in db.execute("SELECT * FROM widgets"):
            r = dict(zip(cols, row))
            for kind in ("clicks", "impressions"):
                if r.get(kind):
                    c[(r["parent_post_id"], r["target_post_id"], kind)] += r[kind]
    return c


@pytest.mark.parametrize("max_entries", [100_000, 30])
def test_sqlite_totals_exact(redis_url, namespace, tmp_path, max_entries, helpers, client) -> None:
    evs = events(20_000, 500)
    db = tmp_path / "w.db"
    cfg = widget_config(tmp_path, f"sqlite:///{db}", max_entries=max_entries)
    result = phonon(
        "run", "-c", str(cfg), redis_url=redis_url, namespace=namespace, stdin=as_lines(evs)
    )
    assert result.returncode == 0, result.stderr
    assert sqlite_totals(db) == totals(evs)
    stderr = result.stderr.decode()
    assert "events read 20000, routed 20000, unmatched 0, dead-lettered 0" in stderr
    assert helpers.namespace_keys(client, namespace) == []


def test_postgres_totals_exact(redis_url, namespace, tmp_path, postgres_url) -> None:
    import psycopg

    evs = events(5_000, 300, seed=3)
    cfg = widget_config(tmp_path, postgres_url, max_entries=40)
    result = phonon(
        "run", "-c", str(cfg), redis_url=redis_url, namespace=namespace, stdin=as_lines(evs)
    )
    assert result.returncode == 0, result.stderr
    got: Counter = Counter()
    with psycopg.connect(postgres_url) as conn:
        for p, t, clicks, imps in conn.execute(
            "SELECT parent_post_id, target_post_id, clicks, impressions FROM widgets"
        ):
            if clicks:
                got[(p, t, "clicks")] += clicks
            if imps:
                got[(p, t, "impressions")] += imps
    assert got == totals(evs)


def test_yaml_and_toml_agree(redis_url, namespace, tmp_path) -> None:
    evs = events(3_000, 100, seed=11)
    results = []
    for suffix in ("toml", "yaml"):
        folder = tmp_path / suffix
        folder.mkdir()
        db = folder / "w.db"
        cfg = widget_config(folder, f"sqlite:///{db}", suffix=suffix, max_entries=25)
        r = phonon(
            "run", "-c", str(cfg), redis_url=redis_url, namespace=namespace, stdin=as_lines(evs)
        )
        assert r.returncode == 0, r.stderr
        results.append(sqlite_totals(db))
    assert results[0] == results[1] == totals(evs)


def test_jsonl_sink_to_stdout(redis_url, namespace) -> None:
    evs = events(2_000, 50, seed=5)
    r = phonon(
        "run",
        "-c",
        str(ROOT / "configs" / "lines.toml"),
        redis_url=redis_url,
        namespace=namespace,
        stdin=as_lines(evs),
    )
    assert r.returncode == 0, r.stderr
    lines = [orjson.loads(x) for x in r.stdout.splitlines()]
    got = {(x["spec"]["target_post_id"], k): v for x in lines for k, v in x["doc"].items()}
    want: Counter = Counter()
    for e in evs:
        want[(e["target_post_id"], e["event_type"])] += 1
    assert got == dict(want)
    assert {x["collection"] for x in lines} == {"targets"}
    assert len(lines) == len({x["id"] for x in lines})  # one write per key


def test_custom_update_class_from_config_dir(redis_url, namespace, tmp_path) -> None:
    evs = events(1_000, 40, seed=9)
    r = phonon(
        "run",
        "-c",
        str(ROOT / "configs" / "custom.toml"),
        redis_url=redis_url,
        namespace=namespace,
        stdin=as_lines(evs),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert sqlite_totals(tmp_path / "custom.db") == totals(evs)


def test_every_kind_of_bad_line_is_dead_lettered(redis_url, namespace, tmp_path) -> None:
    good = events(500, 20, seed=2)
    bad = [
        (b'{"parent_post_id": 1, "event_type": "clicks"', "invalid JSON"),
        (b'\xff\xfe{"x": 1}', "invalid JSON"),
        (b"[1, 2, 3]", "not a JSON object"),
        (b'"just a string"', "not a JSON object"),
        (b'{"parent_post_id": 1, "event_type": "clicks"}', "missing field 'target_post_id'"),
        # 5 MiB: several reads' worth, yet one dead letter
        (b'{"a": "' + b"x" * (5 << 20) + b'"}', "over the limit of 1,048,576"),
    ]
    lines = [orjson.dumps(e) for e in good]
    for i, (line, _) in enumerate(bad):
        lines.insert(i * 80 + 3, line)
    lines.append(b'{"parent_post_id": 1, "target_post_id": 2, "event_type": "views"}')  # unmatched
    dead = tmp_path / "dead.jsonl"
    db = tmp_path / "w.db"
    cfg = widget_config(tmp_path, f"sqlite:///{db}", max_entries=5)
    r = phonon(
        "run",
        "-c",
        str(cfg),
        "--dead-letter",
        str(dead),
        redis_url=redis_url,
        namespace=namespace,
        stdin=b"\n".join(lines) + b"\n",
    )
    assert r.returncode == 0, r.stderr
    assert sqlite_totals(db) == totals(good)
    letters = [orjson.loads(x) for x in dead.read_bytes().splitlines()]
    assert len(letters) == len(bad)
    for letter, (line, reason) in zip(letters, bad):
        assert reason in letter["reason"]
        assert letter["source"] == "-"
        # The exact bytes, to fix and replay: text as text, anything else in base64.
        kept = letter["line"].encode() if "line" in letter else b64decode(letter["line_base64"])
        assert kept == line and "truncated" not in letter
    assert "line_base64" in letters[1]
    assert (
        f"events read {len(good) + len(bad) + 1}, routed {len(good)}, unmatched 1, "
        f"dead-lettered {len(bad)}"
    ) in r.stderr.decode()


CONFIG_ERRORS = [
    (
        '[[routes]]\nupdate = "phonon_cli.sinks.sql:Counter"\nid = "{a}"\ncolection = "x"\n',
        "routes[0].colection",
        "unknown key",
    ),
    (
        '[[routes]]\nupdate = "nope.nothing:Thing"\nid = "{a}"\n',
        "routes[0].update",
        "cannot import",
    ),
    (
        '[[routes]]\nupdate = "phonon_cli.process:Process"\nid = "{a}"\n',
        "routes[0].update",
        "not a subclass",
    ),
    (
        '[cache]\nsoft_session = "15x"\n[[routes]]\nupdate = "phonon_cli.sinks.sql:Counter"\n'
        'id = "{a}"\n',
        "cache.soft_session",
        "not a duration",
    ),
    ('[[routes]]\nupdate = "phonon_cli.sinks.sql:Counter"\nid = "{a"\n', "routes[0].id", "brace"),
    ("[[routes]\n", "", "line 1"),
    *(
        (
            '[[routes]]\nupdate = "phonon_cli.sinks.sql:Counter"\nid = "{a}"\ncollection = "t"\n'
            f'database = "{db}"\nspec = {{ a = "{{a}}" }}\n',
            "routes[0].database",
            "expected sqlite:///PATH",
        )
        for db in ("views.db", "mysql://x/y")
    ),
]


@pytest.mark.parametrize(("text", "key", "reason"), CONFIG_ERRORS)
def test_config_errors_exit_2_naming_file_and_key(tmp_path, text, key, reason) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    for command in ("check", "run"):
        r = phonon(command, "-c", str(cfg))
        err = r.stderr.decode()
        assert r.returncode == 2, err
        assert str(cfg) in err and key in err and reason in err
        assert "Traceback" not in err


def test_check_accepts_the_examples() -> None:
    for name in ("widgets.toml", "widgets.yaml", "lines.toml", "custom.toml"):
        r = phonon("check", "-c", str(ROOT / "configs" / name))
        assert r.returncode == 0, r.stderr
        assert b"ok, 1 route(s)" in r.stdout


def test_unreachable_store_exits_3_without_password(tmp_path) -> None:
    cfg = widget_config(tmp_path, f"sqlite:///{tmp_path / 'w.db'}")
    r = phonon(
        "--redis-url", "redis://admin:hunter2@127.0.0.1:1/0", "run", "-c", str(cfg), stdin=b"{}\n"
    )
    err = r.stderr.decode()
    assert r.returncode == 3, err
    assert "127.0.0.1:1" in err and "hunter2" not in err and "Traceback" not in err


def test_embedded_default_store(tmp_path) -> None:
    evs = events(1_000, 30)
    db = tmp_path / "w.db"
    cfg = widget_config(tmp_path, f"sqlite:///{db}", max_entries=10)
    env = {"PHONON_HOME": str(tmp_path / "home")}
    env_clean = {k: v for k, v in os.environ.items() if k != "PHONON_REDIS_URL"}
    try:
        r = subprocess.run(
            [sys.executable, "-m", "phonon_cli", "run", "-c", str(cfg)],
            input=as_lines(evs),
            capture_output=True,
            timeout=60,
            env={**env_clean, **env},
        )
        assert r.returncode == 0, r.stderr
        assert sqlite_totals(db) == totals(evs)
        assert (tmp_path / "home" / "redis.pid").exists()
    finally:
        from phonon_cli.store.connection import EmbeddedServer

        EmbeddedServer(tmp_path / "home").stop()


def test_sigterm_mid_stream_loses_nothing(redis_url, namespace, tmp_path, client, helpers) -> None:
    evs = events(3_000, 200, seed=4)
    db = tmp_path / "w.db"
    cfg = widget_config(tmp_path, f"sqlite:///{db}", max_entries=50)
    proc = helpers.start_worker(redis_url, namespace, cfg)
    assert proc.stdin is not None
    proc.stdin.write(as_lines(evs))
    proc.stdin.flush()  # and keep stdin open: the worker is mid-stream

    helpers.wait_for(
        lambda: len(evs) in helpers.events_read(client, namespace).values(),
        what="the worker to read every event",
    )
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    proc.stdin.close()
    assert proc.returncode == 0, err
    assert sqlite_totals(db) == totals(evs)
    assert helpers.namespace_keys(client, namespace) == []


def test_sessions_expire_while_input_is_idle(redis_url, namespace, tmp_path, helpers) -> None:
    evs = events(300, 20, seed=8)
    db = tmp_path / "w.db"
    cfg = widget_config(tmp_path, f"sqlite:///{db}")
    proc = helpers.start_worker(redis_url, namespace, cfg, "--soft-session", "1s")
    assert proc.stdin is not None
    proc.stdin.write(as_lines(evs))
    proc.stdin.flush()  # no more input, but stdin stays open

    def landed() -> bool:
        try:
            return sqlite_totals(db) == totals(evs)
        except sqlite3.OperationalError:  # no table yet (or locked by the writer)
            return False

    try:
        helpers.wait_for(landed, timeout_s=15, what="idle keys to be executed by soft session")
        assert proc.poll() is None  # still running: expiry, not end of input, wrote them
    finally:
        _, err = proc.communicate(timeout=30)  # closes stdin: end of input
    assert proc.returncode == 0, err
    assert sqlite_totals(db) == totals(evs)  # and nothing twice at exit


def test_second_signal_caches_partials_and_flush_executes_them(
    redis_url, namespace, tmp_path, client, helpers
) -> None:
    out = tmp_path / "out.jsonl"
    out.touch()
    cfg = tmp_path / "slow.toml"
    cfg.write_text(
        '[[routes]]\nupdate = "widgets:SlowCounting"\nid = "{target_post_id}"\n'
        'collection = "w"\ndoc = { "{event_type}" = 1 }\n'
    )
    env = {
        **os.environ,
        "PHONON_TEST_OUT": str(out),
        "PHONON_TEST_SLOW_S": "1",
        "PYTHONPATH": str(helpers.helpers_dir),
    }
    evs = events(9_000, 3_000, seed=12)
    base = helpers.phonon_command(redis_url, namespace)
    proc = helpers.start_worker(redis_url, namespace, cfg, env=env)
    assert proc.stdin is not None
    proc.stdin.write(as_lines(evs))
    proc.stdin.flush()

    helpers.wait_for(
        lambda: len(evs) in helpers.events_read(client, namespace).values(),
        what="the worker to read every event",
    )
    proc.send_signal(signal.SIGTERM)  # warm stop: drain, a slow batch at a time
    helpers.wait_for(lambda: out.read_bytes(), what="the first batch to be written")
    proc.send_signal(signal.SIGTERM)  # now: cache the rest in redis and go
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err

    def written() -> Counter:
        c: Counter = Counter()
        for record in map(orjson.loads, out.read_bytes().splitlines()):
            for kind, n in record["doc"].items():
                c[(int(record["resource"].split(":")[1]), kind)] += n
        return c

    want: Counter = Counter()
    for e in evs:
        want[(e["target_post_id"], e["event_type"])] += 1
    first = written()
    assert 0 < sum(first.values()) < len(evs)  # some written, the rest waiting in redis
    r = subprocess.run(
        [*base, "flush", "--all", "-c", str(cfg)], capture_output=True, env=env, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert written() == want
    assert helpers.namespace_keys(client, namespace) == []


def test_several_routes_feed_from_one_event(redis_url, namespace, tmp_path) -> None:
    evs = events(2_000, 60, seed=21)
    db = tmp_path / "w.db"
    cfg = widget_config(tmp_path, f"sqlite:///{db}", max_entries=7)
    cfg.write_text(
        cfg.read_text() + (ROOT / "configs" / "lines.toml").read_text().split("\n", 1)[1]
    )
    r = phonon("run", "-c", str(cfg), redis_url=redis_url, namespace=namespace, stdin=as_lines(evs))
    assert r.returncode == 0, r.stderr
    assert sqlite_totals(db) == totals(evs)
    per_target: Counter = Counter()
    for line in r.stdout.splitlines():
        x = orjson.loads(line)
        for kind, n in x["doc"].items():
            per_target[(x["spec"]["target_post_id"], kind)] += n
    want: Counter = Counter()
    for e in evs:
        want[(e["target_post_id"], e["event_type"])] += 1
    assert per_target == want
    assert f"events read {len(evs)}, routed {len(evs)}," in r.stderr.decode()


def test_a_batch_is_sent_without_waiting_for_its_reply(tmp_path: Path) -> None:
    """The run loop hands Redis a batch and goes on with the next events: ``send``
    returns with Redis stopped (SIGSTOP, 2 s), and the next ``wait`` reads the
    reply and writes what the batch took. Before, ``send`` waited the 2 s."""
    import threading
    import time

    from phonon_cli.core.process import Process
    from phonon_cli.run.loop import Batcher
    from phonon_cli.sinks.sql import Counter as SqlCounter
    from phonon_cli.store.connection import EmbeddedServer

    server = EmbeddedServer(tmp_path / "home")
    process = Process(redis_url=server.ensure_running(), namespace="inflight")
    try:
        db = tmp_path / "w.db"
        updates = [
            SqlCounter(
                process,
                f"k{i}",
                database=f"sqlite:///{db}",
                collection="w",
                spec={"k": i},
                doc={"n": i + 1},
                acquire=False,
            )
            for i in range(20)
        ]
        batcher = Batcher(process, max_keys=1000, max_age_s=60)
        for u in updates:
            batcher.add_acquire(u)
        batcher.send()
        batcher.wait()
        batcher.add_release(updates)
        pid = int((server.home / "redis.pid").read_text())
        os.kill(pid, signal.SIGSTOP)
        resume = threading.Timer(2.0, os.kill, (pid, signal.SIGCONT))
        resume.start()
        try:
            started = time.monotonic()
            batcher.send()
            sent_s = time.monotonic() - started
        finally:
            resume.join()
            os.kill(pid, signal.SIGCONT)
        assert sent_s < 1.0, f"send waited {sent_s:.1f}s for a stopped Redis"
        batcher.wait()
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*), sum(n) FROM w").fetchone() == (20, 210)
    finally:
        process.stop()
        server.stop()


def test_a_sole_holder_leaves_its_keys_in_two_redis_calls_each_and_the_rest_the_full_way(
    tmp_path: Path,
) -> None:
    """Keys only this worker holds, with nothing deposited, leave the sole holder's way
    (RELEASE_ALONE: two redis.calls a key inside the script, where RELEASE made six)
    and are written; in the same batch a key another worker holds is deposited for it,
    and a key with a partial waiting is taken and written with it: exact totals.
    On main the 100 lone keys cost 6 calls each (SREM, HDEL, HLEN, TYPE, HGET, DEL)."""
    import redis as redis_py

    from phonon_cli.core.process import Process
    from phonon_cli.core.update import end_sessions
    from phonon_cli.run.loop import Batcher
    from phonon_cli.sinks.sql import Counter as SqlCounter
    from phonon_cli.store.connection import EmbeddedServer

    server = EmbeddedServer(tmp_path / "home")
    url = server.ensure_running()
    mine = Process(redis_url=url, namespace="alone")
    other = Process(redis_url=url, namespace="alone")
    db = tmp_path / "w.db"

    def counter(p: Process, key: str, n: int) -> SqlCounter:
        return SqlCounter(
            p,
            key,
            database=f"sqlite:///{db}",
            collection="w",
            spec={"k": key},
            doc={"n": n},
            acquire=False,
        )

    try:
        lone = [counter(mine, f"lone{i}", 1) for i in range(100)]
        shared, waiting = counter(mine, "shared", 10), counter(mine, "waiting", 100)
        batcher = Batcher(mine, max_keys=1000, max_age_s=60)
        for u in [*lone, shared, waiting]:
            batcher.add_acquire(u)
        batcher.send()
        batcher.wait()
        held = counter(other, "shared", 1000)
        left = counter(other, "waiting", 10000)
        end_sessions([], acquire=[held, left])
        end_sessions([left], mode="cache")  # a partial waits for the last holder
        monitor = redis_py.Redis(unix_socket_path=str(server.socket_path))
        monitor.config_resetstat()
        batcher.add_release(lone)
        batcher.send()
        batcher.wait()
        stats = monitor.info("commandstats")
        calls = sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_evalsha",))
        assert calls <= 2 * len(lone) + 20, stats  # (and a heartbeat or two)
        batcher.add_release([shared, waiting])
        batcher.send()
        batcher.wait()
        end_sessions([held])  # the last holder of "shared" takes what mine deposited
        with sqlite3.connect(db) as conn:
            rows = dict(conn.execute("SELECT k, n FROM w"))
        assert rows == {**{f"lone{i}": 1 for i in range(100)}, "shared": 1010, "waiting": 10100}
        monitor.close()
    finally:
        mine.stop()
        other.stop()
        server.stop()
