"""Poison aggregates never block others, and recovery that cannot run says so: real
``phonon run`` processes, real Redis, real SQLite, exact totals."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from phonon_cli.cli import main
from phonon_cli.store.keys import Keys
from phonon_cli.store.lock import Lock

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

CONFIG = """
[[routes]]
update = "phonon_cli.sinks.sql:Counter"
id = "{k}"
collection = "t"
database = "sqlite:///DB"
spec = { k = "{k}" }
doc = { "{c}" = 1 }
"""

HEALTHY = 1_050
COLUMNS = 2_100
"""More than SQLite's 2,000 columns: the bad key's write can never succeed."""


def write_config(tmp_path: Path) -> tuple[Path, Path]:
    db = tmp_path / "t.db"
    cfg = tmp_path / "phonon.toml"
    cfg.write_text(CONFIG.replace("DB", str(db)))
    return cfg, db


def rows(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT k, n FROM t").fetchall())


def cli(redis_url: str, namespace: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["--redis-url", redis_url, "--namespace", namespace, *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_one_poison_key_is_quarantined_and_every_healthy_key_written(
    redis_url, namespace, tmp_path, helpers, client
) -> None:
    cfg, db = write_config(tmp_path)
    healthy = [{"k": f"h{i}", "c": "n"} for i in range(HEALTHY)]
    poison = [{"k": "bad", "c": f"c{j}"} for j in range(COLUMNS)]
    # The bad key sits in the middle of the healthy ones: same batch, same transaction.
    events = healthy[: HEALTHY // 2] + poison + healthy[HEALTHY // 2 :] + [healthy[0]]
    lines = b"".join(orjson.dumps(e) + b"\n" for e in events)
    cmd = [*helpers.phonon_command(redis_url, namespace), "run", "-c", str(cfg)]
    r = subprocess.run(
        [*cmd, "--dead-letter", str(tmp_path / "d")], input=lines, capture_output=True
    )
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "1 quarantined: their write can never succeed" in err
    written = rows(db)
    assert written == {**{f"h{i}": 1 for i in range(HEALTHY)}, "h0": 2}

    # status counts and lists it, with its error
    report = orjson.loads(cli(redis_url, namespace, "status", "--json")[1])
    assert report["totals"]["quarantined"] == 1
    ((q,),) = [report["quarantined"]]
    assert (q["resource"], q["records"]) == ("t:bad", 1) and "too many columns" in q["error"]
    code, table, _ = cli(redis_url, namespace, "status")
    assert (
        code == 0 and "QUARANTINED (1; see: phonon quarantine list)" in table and "t:bad" in table
    )

    # list, show, export
    code, out, _ = cli(redis_url, namespace, "quarantine", "list", "--json")
    assert code == 0 and orjson.loads(out)["resource"] == "t:bad"
    code, out, _ = cli(redis_url, namespace, "quarantine", "show", "t:bad")
    assert code == 0 and "too many columns" in out
    assert cli(redis_url, namespace, "quarantine", "show", "t:nothing")[0] == 1
    export = tmp_path / "q.jsonl"
    assert cli(redis_url, namespace, "quarantine", "export", str(export))[0] == 0
    (record,) = [orjson.loads(line) for line in export.read_bytes().splitlines()]
    assert record["resource"] == "t:bad" and record["kind"] == "sums"
    assert record["recipe"]["cls"] == "phonon_cli.sinks.sql:Counter"
    assert len(record["payload"].splitlines()) == COLUMNS

    # retry: still too many columns, so it fails again and is quarantined again
    code, _, err = cli(redis_url, namespace, "quarantine", "retry", "t:*", "-c", str(cfg))
    assert code == 1 and "failed again" in err
    assert (
        orjson.loads(cli(redis_url, namespace, "status", "--json")[1])["totals"]["quarantined"] == 1
    )

    # drop: refused without --yes, then gone
    code, out, err = cli(redis_url, namespace, "quarantine", "drop", "t:*")
    assert code == 2 and out.strip() == "t:bad" and "--yes" in err
    assert cli(redis_url, namespace, "quarantine", "drop", "t:*", "--yes")[0] == 0
    assert cli(redis_url, namespace, "quarantine", "list", "--json")[1] == ""
    assert helpers.namespace_keys(client, namespace) == []
    assert rows(db) == written


def test_a_batch_failing_as_a_whole_is_split_until_the_poison_key_is_alone(
    redis_url, namespace, tmp_path, helpers, client
) -> None:
    """A constraint of the table fails the whole transaction (nothing says which row):
    the batch is split until the failing key is alone; once the table is fixed by
    hand, retry -c writes it, exactly once."""
    cfg, db = write_config(tmp_path)
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE t (k TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0 CHECK (n < 5))"
        )
    events = [{"k": f"h{i}", "c": "n"} for i in range(HEALTHY)]
    events[HEALTHY // 3 : HEALTHY // 3] = [{"k": "bad", "c": "n"}] * 7
    lines = b"".join(orjson.dumps(e) + b"\n" for e in events)
    cmd = [*helpers.phonon_command(redis_url, namespace), "run", "-c", str(cfg)]
    r = subprocess.run(
        [*cmd, "--dead-letter", str(tmp_path / "d")], input=lines, capture_output=True
    )
    assert r.returncode == 0, r.stderr.decode()
    assert rows(db) == {f"h{i}": 1 for i in range(HEALTHY)}
    (record,) = client.lrange(Keys(namespace).resource("t:bad").quarantine, 0, -1)
    assert "CHECK constraint failed" in orjson.loads(record)["error"]
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE t RENAME TO old")
        conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO t SELECT * FROM old")
    code, _, err = cli(redis_url, namespace, "quarantine", "retry", "-c", str(cfg))
    assert code == 0, err
    assert "executed 1" in err
    assert rows(db) == {**{f"h{i}": 1 for i in range(HEALTHY)}, "bad": 7}
    assert helpers.namespace_keys(client, namespace) == []


def dead_holder_with_a_partial(redis_url, namespace, tmp_path, helpers, client) -> Path:
    """A worker holding key ``a`` is killed while another run's 3 events for ``a`` wait
    in Redis as its partial: recovery has to release the dead holder before anyone
    can write them. Returns the config."""
    cfg, _ = write_config(tmp_path)
    keys = Keys(namespace)
    holder = helpers.start_worker(redis_url, namespace, cfg, "--dead-letter", str(tmp_path / "d"))
    assert holder.stdin is not None
    holder.stdin.write(b'{"k": "a", "c": "n"}\n')
    holder.stdin.flush()
    nodes = keys.resource("t:a").nodes
    helpers.wait_for(lambda: client.hlen(nodes) == 1, what="the holder to take the key")
    cmd = [*helpers.phonon_command(redis_url, namespace), "run", "-c", str(cfg)]
    lines = b'{"k": "a", "c": "n"}\n' * 3
    r = subprocess.run(
        [*cmd, "--dead-letter", str(tmp_path / "d")], input=lines, capture_output=True
    )
    assert r.returncode == 0, r.stderr.decode()
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=30)
    (dead_id,) = client.hkeys(nodes)
    helpers.wait_for(lambda: not client.exists(keys.alive(dead_id)), what="the holder to be dead")
    return cfg


def test_a_recovery_lock_held_by_a_dead_process_is_reported_and_taken_over(
    redis_url, namespace, tmp_path, helpers, client
) -> None:
    """A worker killed while holding the recovery lock: status says who holds it
    (dead) and until when; flush -c takes it over, since its holder is dead, and
    writes what waited, instead of "executed 0" (or waiting the lock's 60 s)."""
    cfg = dead_holder_with_a_partial(redis_url, namespace, tmp_path, helpers, client)
    keys = Keys(namespace)
    env = {**os.environ, "PHONON_FAULT": "in-recovery:kill"}
    recoverer = helpers.start_worker(redis_url, namespace, cfg, "--dead-letter", "d2", env=env)
    recoverer.communicate(timeout=30)
    assert recoverer.returncode == -signal.SIGKILL
    owner = client.get(keys.recovery_lock).rpartition(".")[0]
    helpers.wait_for(lambda: not client.exists(keys.alive(owner)), what="the recoverer to be dead")

    report = orjson.loads(cli(redis_url, namespace, "status", "--json")[1])
    lock = report["recovery_lock"]
    assert lock["owner"] == owner
    assert lock["owner_alive"] is False and 0 < lock["expires_in_s"] <= 60
    code, table, _ = cli(redis_url, namespace, "status")
    assert "recovery: the recovery lock is held by process" in table

    code, _, err = cli(redis_url, namespace, "flush", "-c", str(cfg), "--all")
    assert code == 0, err
    assert "executed 1" in err
    assert rows(tmp_path / "t.db") == {"a": 3}  # the killed holder's one event died with it
    assert client.get(keys.recovery_lock) is None


def test_flush_says_who_holds_the_recovery_lock_while_its_holder_lives(
    redis_url, namespace, tmp_path, helpers, client, make_process
) -> None:
    """The recovery lock held by a live process: flush -c cannot release the dead
    holder's key, so it says who is recovering and until when, and exits 1 listing
    what waits (not "executed 0" and exit 0)."""
    cfg = dead_holder_with_a_partial(redis_url, namespace, tmp_path, helpers, client)
    keys = Keys(namespace)
    live = make_process(recover_failed_processes=False)
    lock = Lock(client, keys.recovery_lock, block=False, ttl_ms=60_000, owner=live.id).acquire()

    code, out, err = cli(redis_url, namespace, "flush", "-c", str(cfg), "--all")
    assert code == 1, err
    assert out.split() == ["t:a"]
    assert f"the recovery lock is held by process {live.id} (alive, recovering), expires in" in err
    assert "executed 0" in err  # said, but no longer the last word: exit 1

    lock.release()  # as its holder does when done: then flush -c writes it
    code, _, err = cli(redis_url, namespace, "flush", "-c", str(cfg), "--all")
    assert code == 0, err
    assert rows(tmp_path / "t.db") == {"a": 3}


@pytest.mark.skipif(not CI, reason="the long variant runs in CI")
def test_poison_keys_among_many_batches(redis_url, namespace, tmp_path, helpers) -> None:
    """Several poison keys spread over several batches, with a small cache."""
    cfg, db = write_config(tmp_path)
    events = [{"k": f"h{i}", "c": "n"} for i in range(3_000)]
    for b in range(3):
        events[b * 1_000 + 500 : b * 1_000 + 500] = [
            {"k": f"bad{b}", "c": f"c{j}"} for j in range(COLUMNS)
        ]
    lines = b"".join(orjson.dumps(e) + b"\n" for e in events)
    cmd = [*helpers.phonon_command(redis_url, namespace), "run", "-c", str(cfg)]
    cmd += ["--max-entries", "700", "--dead-letter", str(tmp_path / "d")]
    r = subprocess.run(cmd, input=lines, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    assert rows(db) == {f"h{i}": 1 for i in range(3_000)}
    code, out, _ = cli(redis_url, namespace, "quarantine", "list", "--json")
    assert sorted(orjson.loads(line)["resource"] for line in out.splitlines()) == [
        "t:bad0",
        "t:bad1",
        "t:bad2",
    ]
