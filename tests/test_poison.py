"""Poison values and poison aggregates, with real ``phonon run`` processes and real Redis.

A value no sink can hold (a number past int64, a sum that overflows, a null or an
object where a key or column is built) is dead-lettered with its reason; the good
events around it are written exactly. A sum that only overflows once two workers'
partials meet in Redis is quarantined, not a lost store.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from phonon_cli.cli import main
from phonon_cli.sinks.sql import Counter
from phonon_cli.store.keys import Keys

CONFIG = """
[[routes]]
update = "phonon_cli.sinks.sql:Counter"
id = "{k}"
collection = "t"
database = "sqlite:///DB"
spec = { k = "{k}" }
doc = { n = "{n}" }
"""

NULLS = """
[[routes]]
update = "phonon_cli.sinks.sql:Counter"
id = "{user}"
collection = "t"
database = "sqlite:///DB"
spec = { user = "{user}" }
doc = { "{event}" = 1 }
"""

BIG = 9_000_000_000_000_000_000
"""Within int64; two of them are not."""


def write_config(tmp_path: Path, text: str = CONFIG) -> tuple[Path, Path]:
    db = tmp_path / "t.db"
    cfg = tmp_path / "phonon.toml"
    cfg.write_text(text.replace("DB", str(db)))
    return cfg, db


def rows(db: Path, *columns: str) -> dict:
    with sqlite3.connect(db) as conn:
        return {r[0]: r[1:] for r in conn.execute(f"SELECT {', '.join(columns)} FROM t")}


def run(
    redis_url: str, namespace: str, helpers: object, cfg: Path, events: list, dead: Path
) -> subprocess.CompletedProcess[bytes]:
    lines = b"".join(orjson.dumps(e) + b"\n" for e in events)
    cmd = [*helpers.phonon_command(redis_url, namespace), "run", "-c", str(cfg)]  # type: ignore[attr-defined]
    return subprocess.run([*cmd, "--dead-letter", str(dead)], input=lines, capture_output=True)


def dead_letters(path: Path) -> list[tuple[dict, str]]:
    if not path.exists():
        return []
    return [
        (orjson.loads(d["line"]), d["reason"])
        for d in map(orjson.loads, path.read_bytes().splitlines())
    ]


def test_numbers_no_sink_can_hold_are_dead_lettered(
    redis_url, namespace, tmp_path, helpers, client
) -> None:
    cfg, db = write_config(tmp_path, CONFIG.replace('{ n = "{n}" }', '{ "{c}" = "{n}" }'))
    events = [
        {"k": "a", "c": "i", "n": 1},
        {"k": "a", "c": "i", "n": 10_000_000_000_000_000_000},  # past int64 (orjson: an int)
        {"k": "a", "c": "i", "n": 2},
        {"k": "b", "c": "f", "n": 1.5e308},
        {"k": "b", "c": "f", "n": 1.5e308},  # the sum would be inf
        {"k": "b", "c": "f", "n": -1.0},
        {"k": "c", "c": "i", "n": 2**63 - 1},
        {"k": "c", "c": "i", "n": 1},  # the sum would leave int64
        {"k": "c", "c": "i", "n": -5},
        {"k": "d", "c": "f", "n": 1e30},  # a float far past 2**63, but finite: fine
    ]
    dead = tmp_path / "dead.jsonl"
    proc = run(redis_url, namespace, helpers, cfg, events, dead)
    assert proc.returncode == 0, proc.stderr.decode()
    assert rows(db, "k", "i", "f") == {
        "a": (3, 0),
        "b": (0, 1.5e308 - 1.0),
        "c": (2**63 - 6, 0),
        "d": (0, 1e30),
    }
    got = dead_letters(dead)
    assert [e for e, _ in got] == [events[1], events[4], events[7]]
    assert "outside the 64-bit range" in got[0][1]
    assert "the sum of 'f' would leave the 64-bit range" in got[1][1]
    assert "the sum of 'i' would leave the 64-bit range" in got[2][1]
    assert "dead-lettered 3" in proc.stderr.decode()
    assert helpers.namespace_keys(client, namespace) == []


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ({"user": None, "event": "click"}, "field 'user' is null"),
        ({"user": {"id": 1}, "event": "click"}, "field 'user' is an object"),
        ({"user": [1], "event": "click"}, "field 'user' is a list"),
        ({"user": "u1", "event": None}, "field 'event' is null"),
        ({"user": "u1", "event": ["a"]}, "field 'event' is a list"),
    ],
)
def test_a_null_or_object_key_or_column_is_dead_lettered(
    redis_url, namespace, tmp_path, helpers, client, event, reason
) -> None:
    cfg, db = write_config(tmp_path, NULLS)
    events = [{"user": "u1", "event": "click"}, event, {"user": "u1", "event": "click"}]
    dead = tmp_path / "dead.jsonl"
    proc = run(redis_url, namespace, helpers, cfg, events, dead)
    assert proc.returncode == 0, proc.stderr.decode()
    assert rows(db, "user", "click") == {"u1": (2,)}
    ((line, why),) = dead_letters(dead)
    assert line == event and why.startswith(reason)
    assert helpers.namespace_keys(client, namespace) == []


def test_a_null_spec_value_is_dead_lettered(redis_url, namespace, tmp_path, helpers) -> None:
    cfg, db = write_config(
        tmp_path, CONFIG.replace('spec = { k = "{k}" }', 'spec = { k = "{k}", s = "{s}" }')
    )
    events = [
        {"k": "a", "s": None, "n": 1},
        {"k": "a", "s": "x", "n": 2},
        {"k": "b", "s": "y", "n": 3},
    ]
    dead = tmp_path / "dead.jsonl"
    proc = run(redis_url, namespace, helpers, cfg, events, dead)
    assert proc.returncode == 0, proc.stderr.decode()
    assert rows(db, "k", "s", "n") == {"a": ("x", 2), "b": ("y", 3)}
    assert dead_letters(dead) == [(events[0], "spec 's' is null: a key needs a scalar")]


def test_a_sum_that_overflows_in_redis_is_quarantined_not_a_lost_store(
    redis_url, namespace, tmp_path, helpers, client
) -> None:
    """Each worker's partial fits; the second deposit would not fit beside the first."""
    cfg, db = write_config(tmp_path)
    keys = Keys(namespace).resource("t:z")
    holder = helpers.start_worker(redis_url, namespace, cfg, "--dead-letter", str(tmp_path / "d0"))
    try:
        assert holder.stdin is not None
        holder.stdin.write(b'{"k": "z", "n": 1}\n')
        holder.stdin.flush()
        helpers.wait_for(lambda: client.hlen(keys.nodes) == 1, what="the holder to take z")
        for i in (1, 2):
            proc = run(
                redis_url, namespace, helpers, cfg, [{"k": "z", "n": BIG}], tmp_path / f"d{i}"
            )
            assert proc.returncode == 0, proc.stderr.decode()
        assert "quarantined" in proc.stderr.decode()
        assert client.hlen(keys.nodes) == 1  # the refused worker left all the same
    finally:
        _, err = holder.communicate(timeout=30)
    assert holder.returncode == 0, err.decode()
    assert rows(db, "k", "n") == {"z": (BIG + 1,)}
    (record,) = [orjson.loads(r) for r in client.lrange(keys.quarantine, 0, -1)]
    assert record["payload"] == f"n\t{BIG}\n" and "outside int64" in record["error"]
    assert client.exists(keys.nodes, keys.meta, keys.partials) == 0


def test_flush_no_longer_fails_forever_on_a_null_key(
    redis_url, namespace, tmp_path, helpers, client, make_process
) -> None:
    """A partial with a null spec, left in Redis by an older version: flush -c sets it
    aside (quarantine) instead of failing on it at every run."""
    cfg, db = write_config(tmp_path, NULLS)
    p = make_process()
    url = f"sqlite:///{db}"
    Counter(p, "null", database=url, collection="t", spec={"user": None}, doc={"click": 2}).cache()
    Counter(p, "u1", database=url, collection="t", spec={"user": "u1"}, doc={"click": 3}).cache()
    p.stop()
    base = ["--redis-url", redis_url, "--namespace", namespace]
    for _ in range(2):
        result = CliRunner().invoke(main, [*base, "flush", "-c", str(cfg), "--all"])
        assert result.exit_code == 0, result.output
    assert rows(db, "user", "click") == {"u1": (3,)}
    keys = Keys(namespace).resource("t:null")
    (record,) = [orjson.loads(r) for r in client.lrange(keys.quarantine, 0, -1)]
    assert "spec 'user' is null" in record["error"] and record["payload"] == "click\t2\n"


def test_a_custom_merge_past_int64_is_quarantined_and_the_rest_written(
    redis_url, namespace, tmp_path, helpers, client
) -> None:
    """A custom ``Update.merge`` sums in Python, past int64, where no check at the
    door can see it. Its state cannot be deposited (orjson refuses the number): the
    run ended "state is not JSON", exit 1, with every other key of the batch lost.
    Now that aggregate is quarantined whole and the run goes on."""
    out = tmp_path / "out.jsonl"
    out.touch()
    cfg = tmp_path / "custom.toml"
    cfg.write_text(
        '[[routes]]\nupdate = "widgets:WidgetUpdate"\nid = "{k}"\ncollection = "t"\n'
        'doc = { n = "{n}" }\n'
    )
    events = [{"k": "big", "n": 2**62}] * 4 + [{"k": "ok", "n": 1}] * 3
    lines = b"".join(orjson.dumps(e) + b"\n" for e in events)
    env = {**os.environ, "PHONON_TEST_OUT": str(out), "PYTHONPATH": str(helpers.helpers_dir)}
    cmd = [*helpers.phonon_command(redis_url, namespace), "run", "-c", str(cfg)]
    proc = subprocess.run(cmd, input=lines, capture_output=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    written = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [(w["resource"], w["doc"]) for w in written] == [("t:ok", {"n": 3})]
    keys = Keys(namespace).resource("t:big")
    (record,) = [orjson.loads(r) for r in client.lrange(keys.quarantine, 0, -1)]
    assert "64-bit" in record["error"]
    assert orjson.loads(record["payload"].replace(str(2**64), "0")) == {
        "doc": {"n": 0},
        "state": {},
    }
    assert str(2**64) in record["payload"]  # the whole aggregate, kept as it was
    assert client.exists(keys.nodes, keys.partials) == 0


def test_retrying_an_aggregate_past_int64_is_refused_and_it_stays_quarantined(
    redis_url, namespace, tmp_path, helpers, client
) -> None:
    """A custom ``merge`` summed past int64, and the aggregate was quarantined with its
    number written out whole. ``phonon quarantine retry`` put it back as a partial
    that reads as JSON with a float (2**64 became 1.8446744073709552e+19: exit 0, the
    number no longer exact). Now retry refuses it, naming the key and why, exits 1,
    and keeps the record as it was; a record whose numbers fit goes back exact."""
    out = tmp_path / "out.jsonl"
    out.touch()
    cfg = tmp_path / "custom.toml"
    cfg.write_text(
        '[[routes]]\nupdate = "widgets:WidgetUpdate"\nid = "{k}"\ncollection = "t"\n'
        'doc = { n = "{n}" }\n'
    )
    events = [{"k": "big", "n": 2**62}] * 4 + [{"k": "ok", "n": 1}] * 3
    lines = b"".join(orjson.dumps(e) + b"\n" for e in events)
    env = {**os.environ, "PHONON_TEST_OUT": str(out), "PYTHONPATH": str(helpers.helpers_dir)}
    base = [*helpers.phonon_command(redis_url, namespace)]
    proc = subprocess.run([*base, "run", "-c", str(cfg)], input=lines, capture_output=True, env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    big = Keys(namespace).resource("t:big")
    (before,) = client.lrange(big.quarantine, 0, -1)
    # A second record, of another key, whose numbers fit: 2**63 - 1 is int64's largest.
    fits = orjson.loads(before)
    fits["payload"] = orjson.dumps({"doc": {"n": 2**63 - 1}, "state": {}}).decode()
    fits["recipe"] = orjson.dumps({**orjson.loads(fits["recipe"]), "id": "fits"}).decode()
    ok = Keys(namespace).resource("t:fits")
    client.rpush(ok.quarantine, orjson.dumps(fits).decode())

    retry = subprocess.run([*base, "quarantine", "retry"], capture_output=True, env=env, text=True)
    assert retry.returncode == 1, retry.stderr
    assert "t:big stays quarantined" in retry.stderr, retry.stderr
    assert str(2**64) in retry.stderr and "int64" in retry.stderr, retry.stderr
    assert client.lrange(big.quarantine, 0, -1) == [before]  # kept as it was
    assert client.exists(big.partials, big.meta) == 0  # nothing put back
    # the one that fits went back, its number exact
    assert client.exists(ok.quarantine) == 0
    flush = subprocess.run([*base, "flush", "-c", str(cfg), "t:fits"], capture_output=True, env=env)
    assert flush.returncode == 0, flush.stderr.decode()
    written = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [(w["resource"], w["doc"]) for w in written][-1] == ("t:fits", {"n": 2**63 - 1})
