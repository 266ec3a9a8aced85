from __future__ import annotations

import orjson
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from widgets import WidgetUpdate

from phonon_cli import LruCache


@pytest.fixture(autouse=True)
def out_file(tmp_path, monkeypatch):
    path = tmp_path / "executed.jsonl"
    path.touch()
    monkeypatch.setenv("PHONON_TEST_OUT", str(path))
    return path


def docs(path) -> dict[str, dict]:
    return {r["resource"]: r["doc"] for r in map(orjson.loads, path.read_bytes().splitlines())}


def test_set_merges_and_evicts_least_recently_used(make_process, out_file) -> None:
    p = make_process()
    cache = LruCache(max_entries=2)
    cache.set("a", WidgetUpdate(p, "a", doc={"c": 1}))
    cache.set("b", WidgetUpdate(p, "b", doc={"c": 1}))
    cache.set("a", WidgetUpdate(p, "a", doc={"c": 2}))  # merge, and a is now newest
    assert cache.size() == 2 and cache.get("a").doc == {"c": 3}
    cache.set("c", WidgetUpdate(p, "c", doc={"c": 1}))  # evicts b
    assert sorted(cache.keys()) == ["a", "c"]
    assert docs(out_file) == {"b": {"c": 1}}
    cache.expire_oldest()
    assert docs(out_file) == {"b": {"c": 1}, "a": {"c": 3}}
    assert cache.expire("c") is True and cache.expire("c") is False
    assert cache.size() == 0


def test_purge_ends_expired_sessions(make_process, out_file) -> None:
    now = [0]
    p = make_process(clock=lambda: now[0])
    cache = LruCache()
    cache.set("old", WidgetUpdate(p, "old", doc={"c": 1}, soft_session=5))
    now[0] = 3_000
    cache.set("new", WidgetUpdate(p, "new", doc={"c": 1}, soft_session=5))
    now[0] = 5_000
    assert cache.purge() == 1
    assert cache.keys() == ["new"] and list(docs(out_file)) == ["old"]


def test_failed_end_session_keeps_the_update(make_process, client, namespace) -> None:
    p = make_process()
    cache = LruCache(max_entries=1)
    cache.set("a", WidgetUpdate(p, "a", doc={"c": 1}))
    good_client = p.client
    p.store_timeout_s = 0.0  # fail at once: retrying a socket that is gone is another test's
    p.client = redis.Redis(
        unix_socket_path="/nonexistent/redis.sock",  # Redis is gone
        retry=Retry(NoBackoff(), 0),
    )
    with pytest.raises(redis.ConnectionError):
        cache.set("b", WidgetUpdate(p, "b", doc={"c": 1}, acquire=False))
    assert cache.size() == 1 and cache.keys() == ["b"]
    assert cache.get_last_failed().resource == "a"
    p.client = good_client
    cache.retry_failed()
    assert cache.failed == []
    assert client.exists(p.keys.resource("a").nodes) == 0
