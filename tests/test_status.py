"""``phonon status``: what it reads from Redis, with real workers, dead ones and none."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import redis
from click.testing import CliRunner

from phonon_cli.cli import main
from phonon_cli.core.reference import acquire_many
from phonon_cli.ops import status as status_mod
from phonon_cli.ops.status import Status, render
from phonon_cli.sinks.sql import Counter
from phonon_cli.store.keys import Keys

DOCS = Path(__file__).parent.parent / "docs" / "status.md"

CONFIG = """
[[routes]]
update = "phonon_cli.sinks.sql:Counter"
id = "{k}"
collection = "widgets"
database = "sqlite:///DB"
spec = { k = "{k}" }
doc = { n = "{n}" }
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "phonon.toml"
    path.write_text(CONFIG.replace("DB", str(tmp_path / "w.db")))
    return path


def cli(redis_url: str, namespace: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["--redis-url", redis_url, "--namespace", namespace, *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def status_json(redis_url: str, namespace: str, *args: str) -> dict:
    code, out, _ = cli(redis_url, namespace, "status", "--json", *args)
    assert code == 0
    return orjson.loads(out)


def send(proc: subprocess.Popen, events: list[dict]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"".join(orjson.dumps(e) + b"\n" for e in events))
    proc.stdin.flush()


def test_status_with_no_processes(redis_url, namespace) -> None:
    report = status_json(redis_url, namespace)
    assert report["namespace"] == namespace
    assert report["store"] == redis_url
    assert (report["processes"], report["references"], report["sources"]) == ([], [], [])
    assert report["totals"]["processes"] == report["totals"]["references"] == 0
    code, out, _ = cli(redis_url, namespace, "status")
    assert code == 0
    assert f"namespace: {namespace}" in out and "(none)" in out


def test_status_never_prints_the_password() -> None:
    result = CliRunner().invoke(main, ["--redis-url", "redis://:hunter2@127.0.0.1:1/0", "status"])
    assert result.exit_code == 3
    assert "hunter2" not in result.output and "127.0.0.1:1" in result.output


def test_live_worker_and_its_references_then_gone(
    redis_url, namespace, config, tmp_path, helpers
) -> None:
    proc = helpers.start_worker(
        redis_url, namespace, config, "--dead-letter", str(tmp_path / "dead.jsonl"), cwd=tmp_path
    )
    try:
        send(proc, [{"k": f"a{i % 3}", "n": 1} for i in range(12)])

        def ready() -> dict | None:
            r = status_json(redis_url, namespace)
            ps = r["processes"]
            ok = len(ps) == 1 and ps[0]["events_read"] == 12 and len(r["references"]) == 3
            return r if ok else None

        report = helpers.wait_for(ready, what="the worker and its references in status")
        (p,) = report["processes"]
        assert p["alive"] is True and p["pid"] == proc.pid and p["flushable"] is True
        assert p["entries"] == 3 and p["held"] == 3
        refs = {r["resource"]: r for r in report["references"]}
        assert set(refs) == {"widgets:a0", "widgets:a1", "widgets:a2"}
        for ref in refs.values():
            assert ref["holders"] == [p["id"]] and ref["dead_holders"] == []
            assert (ref["cached"], ref["locked"], ref["orphaned"]) == (False, False, False)
        totals = report["totals"]
        assert (totals["alive"], totals["dead"], totals["references"], totals["held"]) == (
            1,
            0,
            3,
            3,
        )
        code, table, _ = cli(redis_url, namespace, "status")
        assert code == 0 and p["id"] in table and "widgets:a1" in table
        assert max(map(len, table.splitlines())) <= 100
    finally:
        _, err = proc.communicate(timeout=20)  # closes stdin: the worker drains and exits
    assert proc.returncode == 0, err.decode()
    report = status_json(redis_url, namespace)
    assert report["processes"] == [] and report["references"] == []


def test_orphaned_partial_and_locks(redis_url, namespace, make_process, tmp_path, helpers) -> None:
    db = f"sqlite:///{tmp_path / 'w.db'}"
    p = make_process()
    Counter(p, "x", database=db, collection="widgets", spec={"k": "x"}, doc={"n": 4}).cache()
    p.stop()  # the partial stays in redis, with nobody holding its resource
    q = make_process()
    acquire_many(q, ["widgets:held"])
    with q.create_reference("widgets:held").lock():
        report = status_json(redis_url, namespace)
        code, table, _ = cli(redis_url, namespace, "status")
    refs = {r["resource"]: r for r in report["references"]}
    orphan = refs["widgets:x"]
    assert orphan["orphaned"] and orphan["cached"] and orphan["holders"] == []
    assert orphan["class"] == "phonon_cli.sinks.sql:Counter" and orphan["times_modified"] == 1
    assert orphan["cached_age_s"] is not None and orphan["kind"] == "sums"
    assert refs["widgets:held"]["locked"] and not refs["widgets:held"]["orphaned"]
    assert report["totals"]["orphaned"] == 1 and report["totals"]["locked"] == 1
    assert "ORPHANED PARTIALS (1; execute" in table and "phonon flush -c CONFIG" in table


def test_json_streams_every_reference_and_limit_keeps_the_oldest(
    redis_url, namespace, make_process, monkeypatch
) -> None:
    monkeypatch.setattr(redis.Redis, "keys", lambda *a, **k: pytest.fail("KEYS used"))
    clock = iter(range(1_000_000, 2_000_000, 1000))
    p = make_process(clock=lambda: next(clock), start_heartbeat=False)
    acquire_many(p, ["widgets:first"])
    acquire_many(p, [f"widgets:{i}" for i in range(2500)])
    report = status_json(redis_url, namespace)
    assert len(report["references"]) == report["totals"]["references"] == 2501
    limited = status_json(redis_url, namespace, "--limit", "2")
    assert [r["resource"] for r in limited["references"]][0] == "widgets:first"
    assert len(limited["references"]) == 2 and limited["totals"]["references"] == 2501
    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, s: str) -> int:
            writes.append(s)
            return len(s)

    reader = Status(p.client, namespace, "x")
    assert reader.write_json(Recorder()) == 0
    assert len(writes) > 2500  # one write per reference: never the whole list at once
    assert orjson.loads("".join(writes))["totals"]["references"] == 2501
    code, table, _ = cli(redis_url, namespace, "status", "--limit", "3")
    assert "REFERENCES (3 oldest of 2,501)" in table and "widgets:first" in table
    assert len(table.splitlines()) < 30
    code, table, _ = cli(redis_url, namespace, "status", "--limit", "0")
    assert "REFERENCES (0 oldest of 2,501)\n(2,501 not shown: raise --limit)" in table
    # The reader of the output goes away after 100 bytes: a quiet stop, exit 0.
    head = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "phonon_cli",
            "--redis-url",
            redis_url,
            "--namespace",
            namespace,
            "status",
            "--json",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert head.stdout is not None and len(head.stdout.read(100)) == 100
    head.stdout.close()
    _, err = head.communicate(timeout=60)
    assert head.returncode == 0 and err == b""


def test_sources_show_committed_offsets_and_unknown_lag(redis_url, namespace, client) -> None:
    keys = Keys(namespace)
    client.hset(keys.offsets("g1", "file:/data/clicks"), mapping={"0": 5, "10": 7, "2": 1})
    client.hset(keys.members("g1", "file:/data/clicks"), mapping={"0": "abc"})
    report = status_json(redis_url, namespace)
    assert [(s["partition"], s["committed"], s["lag"], s["owner"]) for s in report["sources"]] == [
        ("0", 5, None, "abc"),
        ("2", 1, None, None),
        ("10", 7, None, None),
    ]
    assert {s["group"] for s in report["sources"]} == {"g1"}
    assert {s["source"] for s in report["sources"]} == {"file:/data/clicks"}
    _, table, _ = cli(redis_url, namespace, "status")
    row = next(line for line in table.splitlines() if line.startswith("g1"))
    assert row.split()[1:] == ["file:/data/clicks", "0", "5", "-", "abc"]


def test_lag_is_the_end_a_reader_published_minus_committed(
    redis_url, namespace, client, tmp_path, helpers
) -> None:
    part = tmp_path / "topic" / "p-0"
    part.mkdir(parents=True)
    (part / f"{0:020d}.jsonl").write_text("".join(f'{{"a": {i % 50}}}\n' for i in range(3000)))
    config = tmp_path / "lines.toml"
    config.write_text('[[routes]]\nupdate = "phonon_cli.sinks.jsonl:Lines"\nid = "{a}"\n')
    done = subprocess.run(
        [
            *helpers.phonon_command(redis_url, namespace),
            "run",
            "-c",
            str(config),
            "--source",
            f"file:{tmp_path / 'topic'}",
        ],  # fmt: skip
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    keys = Keys(namespace)
    source = f"file:{tmp_path / 'topic'}"
    client.hset(keys.offsets("phonon", source), "p-0", 2500)  # as if 500 were still to commit
    (row,) = status_json(redis_url, namespace)["sources"]
    assert (row["partition"], row["committed"], row["lag"]) == ("p-0", 2500, 500)


def test_table_fits_100_columns_and_every_column_is_documented(
    make_process, namespace, tmp_path
) -> None:
    p = make_process()
    long = "widgets:" + "x" * 150
    acquire_many(p, [long, "widgets:short"])
    dead = make_process(start_heartbeat=False, recover_failed_processes=False)
    acquire_many(dead, [long])
    dead.client.delete(dead.keys.alive(dead.id))
    p.client.hset(
        p.keys.offsets("a-very-long-group-name", "file:/" + "d" * 120),
        mapping={"partition-with-a-long-name": 2**62},
    )
    snap = Status(
        p.client,
        namespace,
        "embedded redis at /" + "s" * 120 + ".sock (data in /" + "h" * 120 + ")",
    ).snapshot(20)
    assert snap.totals.dead == 1
    table = render(snap)
    assert max(len(line) for line in table.splitlines()) <= 100
    assert "dead" in table and "…" in table
    docs = DOCS.read_text()
    for columns in (
        status_mod.PROCESS_COLUMNS,
        status_mod.REFERENCE_COLUMNS,
        status_mod.ORPHAN_COLUMNS,
        status_mod.QUARANTINE_COLUMNS,
        status_mod.SOURCE_COLUMNS,
    ):
        for header in status_mod.headers(columns):
            assert f"`{header}`" in docs, f"column {header} is not in docs/status.md"
            assert header in table or columns in (
                status_mod.ORPHAN_COLUMNS,
                status_mod.QUARANTINE_COLUMNS,
            )


def test_watch_redraws_until_interrupted(redis_url, namespace, monkeypatch) -> None:
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        if len(sleeps) % 2 == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", sleep)
    code, out, _ = cli(redis_url, namespace, "status", "--watch", "0.5")
    assert code == 0 and sleeps == [0.5, 0.5]
    assert out.count(f"namespace: {namespace}") == 2
    code, out, _ = cli(redis_url, namespace, "status", "--json", "--watch", "0.5")
    assert code == 0 and len([orjson.loads(line) for line in out.splitlines()]) == 2
    assert sleeps == [0.5] * 4
