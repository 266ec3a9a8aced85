"""Rough edges a new user meets on the command line (issue 12), each with a real process."""

from __future__ import annotations

import io
import logging
import os
import queue
import signal
import subprocess
import sys
import time
from base64 import b64decode
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from phonon_cli import defaults
from phonon_cli.sources.base import Chunk
from phonon_cli.sources.stdin import StdinSource
from phonon_cli.store.connection import EmbeddedServer


@pytest.fixture(autouse=True)
def stop_embedded_server(tmp_path: Path) -> Iterator[None]:
    """Tests here run phonon with PHONON_HOME=tmp_path/home: stop the embedded server
    it started, so a whole suite does not leave dozens running."""
    yield
    EmbeddedServer(tmp_path / "home").stop()


LINES_TOML = """\
[[routes]]
update = "phonon_cli.sinks.jsonl:Lines"
id = "{a}"
doc = { n = "{n}" }
"""


def read_stdin(data: bytes, limit: int) -> list[Chunk]:
    source = StdinSource(io.BytesIO(data))
    source.max_line_bytes = limit
    out: queue.Queue[Chunk] = queue.Queue()
    source._run(out)
    chunks = []
    while not (chunk := out.get()).end:
        chunks.append(chunk)
    return chunks


def events_and_rejects(chunks: list[Chunk]) -> list[object]:
    return [
        (c.rejects[i].raw, c.rejects[i].truncated) if i in c.rejects else line
        for c in chunks
        for i, line in enumerate(c.lines)
    ]


@pytest.mark.parametrize("limit", [10, 1 << 20])
def test_stdin_keeps_the_exact_bytes_of_a_long_line(limit: int) -> None:
    long = b"\xff" + b"y" * (3 * limit + 70_000)  # several reads, not UTF-8
    data = b"a\n" + long + b"\nb\n" + long + b"\nc"
    got = events_and_rejects(read_stdin(data, limit))
    assert got == [b"a", (long, False), b"b", (long, False), b"c"]


def test_stdin_cuts_a_huge_line_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(defaults, "DEAD_LETTER_KEEP_BYTES", 1000)
    got = events_and_rejects(read_stdin(b"x" * 200_000 + b"\nok\n", 100))
    assert got == [(b"x" * 1000, True), b"ok"]


def run_lines(
    tmp_path: Path, *args: str, stdin: object, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    cfg = tmp_path / "lines.toml"
    cfg.write_text(LINES_TOML)
    return subprocess.Popen(
        [sys.executable, "-m", "phonon_cli", "run", "-c", str(cfg), *args],
        stdin=stdin,  # type: ignore[arg-type]
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PHONON_HOME": str(tmp_path / "home"), **(env or {})},
        cwd=tmp_path,
    )


def test_max_line_bytes_dead_letters_the_line_whole(tmp_path: Path) -> None:
    long = b'{"a": "\xff' + b"z" * 300 + b'", "n": 1}'
    proc = run_lines(
        tmp_path,
        "--max-line-bytes",
        "200",
        "--dead-letter",
        str(tmp_path / "dead.jsonl"),
        stdin=subprocess.PIPE,
    )
    out, err = proc.communicate(b'{"a": "k", "n": 2}\n' + long + b"\n", timeout=60)
    assert proc.returncode == 0, err
    assert [orjson.loads(x) for x in out.splitlines()][0]["doc"] == {"n": 2}
    (letter,) = [orjson.loads(x) for x in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert b64decode(letter["line_base64"]) == long
    assert letter["reason"] == f"line of {len(long)} bytes is over the limit of 200"


def test_a_closed_stdin_is_one_line_and_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "lines.toml"
    cfg.write_text(LINES_TOML)
    r = subprocess.run(
        f"{sys.executable} -m phonon_cli run -c {cfg} <&-",
        shell=True,
        capture_output=True,
        env={**os.environ, "PHONON_HOME": str(tmp_path / "home")},
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert b"Traceback" not in r.stderr
    assert b"stdin is closed" in r.stderr
    assert r.stderr.decode().strip().splitlines() == [
        "Error: stdin is closed: pipe events in, or read another --source"
    ]


def test_sigterm_with_stdin_still_open_exits_0(tmp_path: Path) -> None:
    """``tail -f | phonon run`` stopped by a service manager: no abort at exit."""
    read, write = os.pipe()
    proc = run_lines(tmp_path, "--soft-session", "200ms", stdin=read)
    os.close(read)
    os.write(write, b"".join(b'{"a": %d, "n": 1}\n' % (i % 7) for i in range(200)))
    assert proc.stdout is not None
    assert proc.stdout.readline()  # a session ended: the worker reads, stdin stays open
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    os.close(write)
    assert proc.returncode == 0, err
    assert b"Fatal Python error" not in err


def test_json_logs_are_one_object_a_line(tmp_path: Path) -> None:
    cfg = tmp_path / "lines.toml"
    cfg.write_text(LINES_TOML)
    summary = tmp_path / "summary.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "phonon_cli",
            "--log-format",
            "json",
            "-v",
            "run",
            "-c",
            str(cfg),
            "--summary-json",
            str(summary),
        ],  # fmt: skip
        input=b'{"a": 1, "n": 2}\nnot json\n{"a": 1, "n": 3}\n',
        capture_output=True,
        env={**os.environ, "PHONON_HOME": str(tmp_path / "home")},
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    records = [orjson.loads(line) for line in r.stderr.splitlines()]  # every line parses
    assert {"ts", "level", "logger", "message"} <= set(records[0])
    (end,) = [x for x in records if x.get("summary")]
    assert (end["events_read"], end["routed"], end["dead_lettered"]) == (3, 2, 1)
    written = orjson.loads(summary.read_bytes())
    assert written["events_read"] == 3 and written["exit_code"] == 0
    assert written["keys_executed"] == 1 and written["waiting_in_redis"] == 0


def test_repeated_errors_are_folded() -> None:
    from phonon_cli import logs

    stream = io.StringIO()
    handler = logs.FoldingHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("phonon_cli.test_folding")
    log.addHandler(handler)
    log.propagate = False
    try:
        for _ in range(2315):
            log.error("sink down: %s", "connection refused")
        log.warning("something else")
        log.error("sink down: %s", "connection refused")
        handler.close()
    finally:
        log.removeHandler(handler)
    assert stream.getvalue().splitlines() == [
        "ERROR sink down: connection refused",
        "ERROR ... and 2,314 more like it: sink down: connection refused",
        "WARNING something else",
        "ERROR sink down: connection refused",
    ]


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    read, write = os.pipe()
    proc = run_lines(tmp_path, "--stats-interval", "100ms", "--soft-session", "50ms", stdin=read)
    os.close(read)
    os.write(write, b'{"a": 0, "n": 1}\n')
    assert proc.stdout is not None and proc.stdout.readline()  # it runs: its session ended
    for i in range(1, 5):  # a trickle over a second: several intervals pass
        time.sleep(0.25)
        os.write(write, b'{"a": %d, "n": 1}\n' % i)
    os.close(write)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    progress = [x for x in err.decode().splitlines() if x.startswith("phonon: progress: ")]
    assert len(progress) >= 2, err
    assert "events (" in progress[-1]


def test_stdout_reader_gone_stops_the_run_and_keeps_the_rest(tmp_path: Path) -> None:
    """``phonon run | head -1``: one error line and exit 1, everything unwritten kept."""
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"".join(b'{"a": %d, "n": 1}\n' % (i % 20_000) for i in range(50_000)))
    with open(events, "rb") as stdin:
        proc = run_lines(tmp_path, "--max-entries", "1000", stdin=stdin)
        assert proc.stdout is not None
        assert proc.stdout.readline()  # the first aggregate: then the reader goes away
        proc.stdout.close()
        started = time.monotonic()
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = err.decode().splitlines()
    assert [x for x in lines if "rror" in x] == [lines[-1]], err  # one error line, the last
    assert lines[-1].startswith("Error: stdout's reader went away; ")
    assert "aggregate(s) not written are kept in redis" in lines[-1]
    assert b"Broken pipe" not in err
    assert time.monotonic() - started < 30  # it stopped reading: not 50,000 events of retries
    status = subprocess.run(
        [sys.executable, "-m", "phonon_cli", "status", "--json"],
        capture_output=True,
        env={**os.environ, "PHONON_HOME": str(tmp_path / "home")},
        timeout=60,
        check=True,
    )
    kept = int(lines[-1].split("; ")[1].split()[0])
    assert kept > 0 and orjson.loads(status.stdout)["totals"]["orphaned"] == kept


def counter_config(tmp_path: Path, database: str) -> Path:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[[routes]]\nupdate = "phonon_cli.sinks.sql:Counter"\nid = "{a}"\ncollection = "t"\n'
        f'database = "{database}"\nspec = {{ a = "{{a}}" }}\ndoc = {{ n = "{{n}}" }}\n'
    )
    return cfg


def test_check_connect_reaches_store_and_databases_creating_nothing(
    tmp_path: Path, redis_url: str, postgres_url: str
) -> None:
    from click.testing import CliRunner

    from phonon_cli.cli import main

    db = tmp_path / "sub" / "w.db"
    for database, found in [
        (f"sqlite:///{db}", "SQLite file not there yet: the first write creates it"),
        (postgres_url, "PostgreSQL "),
    ]:
        cfg = counter_config(tmp_path, database)
        r = CliRunner().invoke(
            main, ["--redis-url", redis_url, "check", "-c", str(cfg), "--connect"]
        )
        assert r.exit_code == 0, r.output
        assert "store: " in r.output and ": reached" in r.output
        assert f"routes[0]: {found}" in r.output
    assert not db.exists() and not db.parent.exists()  # nothing created


def test_check_connect_names_what_cannot_be_reached(tmp_path: Path, redis_url: str) -> None:
    from click.testing import CliRunner

    from phonon_cli.cli import main

    cfg = counter_config(tmp_path, "postgresql://app:hunter2@127.0.0.1:1/app")
    r = CliRunner().invoke(main, ["--redis-url", redis_url, "check", "-c", str(cfg), "--connect"])
    assert r.exit_code == 1
    assert "routes[0]: postgresql://app:***@127.0.0.1:1/app: " in r.stderr
    assert "hunter2" not in r.output + r.stderr
    r = CliRunner().invoke(
        main,
        ["--redis-url", "redis://:hunter2@127.0.0.1:1/0", "check", "-c", str(cfg), "--connect"],
    )
    assert r.exit_code == 3 and "hunter2" not in r.output + r.stderr
    assert "redis://:***@127.0.0.1:1/0" in r.stderr


def test_status_figures_are_about_a_second_behind_the_run(
    tmp_path: Path, redis_url: str, namespace: str, client: object, helpers: object
) -> None:
    """With a 30 s heartbeat, status still sees a run's figures within a couple of seconds."""
    read, write = os.pipe()
    cfg = tmp_path / "lines.toml"
    cfg.write_text(LINES_TOML)
    proc = subprocess.Popen(
        # the last --heartbeat-interval wins: 30 s, so only the run loop can be fresh
        [
            *helpers.phonon_command(redis_url, namespace),
            "--heartbeat-interval",
            "30",  # type: ignore[attr-defined]
            "run",
            "-c",
            str(cfg),
        ],  # fmt: skip  # fmt: skip
        stdin=read,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    os.close(read)
    os.write(write, b"".join(b'{"a": %d, "n": 1}\n' % (i % 40) for i in range(500)))
    events_read = helpers.events_read  # type: ignore[attr-defined]
    helpers.wait_for(  # type: ignore[attr-defined]
        lambda: list(events_read(client, namespace).values()) == [500],
        timeout_s=5,
        what="status to see the 500 events (the heartbeat is 30 s away)",
    )
    os.close(write)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_rerunning_a_file_source_read_to_its_end_ends_at_once_saying_nothing_more(
    tmp_path: Path, redis_url: str, namespace: str, helpers: object
) -> None:
    """Row 7: a second run over a partition whose offsets are all committed reads
    nothing, says so in its summary, warns of nothing, and ends within a generous
    bound on a loaded machine (the issue saw 6.6 s)."""
    cfg = tmp_path / "lines.toml"
    cfg.write_text(LINES_TOML)
    log = tmp_path / "one.jsonl"
    log.write_bytes(b"".join(b'{"a": %d, "n": 1}\n' % (i % 10) for i in range(500)))
    cmd = [
        *helpers.phonon_command(redis_url, namespace),  # type: ignore[attr-defined]
        "run", "-c", str(cfg), "--source", f"file:{log}",
        "--dead-letter", str(tmp_path / "dead.jsonl"),
    ]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert b"events read 500," in first.stderr
    started = time.monotonic()
    again = subprocess.run(cmd, capture_output=True, timeout=60)
    elapsed = time.monotonic() - started
    assert again.returncode == 0, again.stderr
    assert again.stdout == b""  # nothing executed twice
    err = again.stderr.decode()
    assert "events read 0, routed 0" in err, err
    assert not any(w in err for w in ("WARNING", "ERROR", "Traceback", "wait")), err
    assert elapsed < 3.0, f"{elapsed:.2f}s with nothing to read"


def test_readme_says_how_to_get_phonon_on_path() -> None:
    """Row 9: the README's "Use" section names the paths `make run` creates (the
    Makefile's virtualenv, the console script pyproject declares), and every
    config its example commands name exists in the repository."""
    import re

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    use = readme.split("\n## Use\n", 1)[1].split("\n## ", 1)[0]
    venv = re.search(r"^VENV \?= (\S+)$", (root / "Makefile").read_text(), re.M)
    assert venv is not None
    pyproject = (root / "pyproject.toml").read_text()
    assert re.search(r'^\[project\.scripts\]\nphonon = "', pyproject, re.M), "no phonon script"
    assert f"`{venv.group(1)}/bin/phonon`" in use
    assert f"`. {venv.group(1)}/bin/activate`" in use
    commands = "".join(re.findall(r"```sh\n(.*?)```", use, re.S))
    configs = re.findall(r"phonon \w+ -c (\S+)", commands)
    assert configs, "the Use section runs no command with a config"
    for path in configs:
        assert (root / path).is_file(), f"README's Use section names {path}, which is not there"
