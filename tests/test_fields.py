"""Per-field strategies at the library level: config validation, routing, and the
property that the aggregate does not depend on order, cache size or split."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import orjson
import pytest
from aggregates import FIELDS, Recorder, expected, fields_toml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phonon_cli.config import Config, load_config
from phonon_cli.core.cache import LruCache
from phonon_cli.exceptions import ConfigError, EventError
from phonon_cli.fields.strategies import Field, hll_add, hll_estimate, merge_slot
from phonon_cli.routing import fields as fieldconfig
from phonon_cli.routing.routes import Route, Router

ROUTE = {
    "update": "aggregates:Recorder",
    "id": "{user}",
    "collection": "sessions",
    "spec": {"user": "{user}"},
    "fields": FIELDS,
}


def route_of(**changes: Any) -> Route:
    return Config.from_mapping({"routes": [{**ROUTE, **changes}]}).routes[0]


def merged_doc(route: Route, events: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """Per id, every event's slots merged in order by one update: the reference."""
    docs: dict[Any, dict[str, Any]] = {}
    for event in events:
        id_, _, slots = route.build(event)
        doc = docs.setdefault(id_, {})
        for slot, v in slots.items():
            doc[slot] = merge_slot(slot, doc[slot], v) if slot in doc else v
    return docs


def values(route: Route, doc: dict[str, Any]) -> dict[str, Any]:
    return {f.field.name: f.field.result(doc) for f in route.fields}


# -- config -----------------------------------------------------------------------------

SQL = """
[[routes]]
update = "phonon_cli.sinks.sql:Aggregate"
id = "{u}"
collection = "t"
database = "sqlite:///t.db"
spec = { u = "{u}" }
"""
REC = '[[routes]]\nupdate = "aggregates:Recorder"\nid = "{u}"\n'

CONFIG_ERRORS = [
    (
        'fields.x = { value = "{a}", merge = "median" }',
        "routes[0].fields.x.merge",
        "unknown strategy 'median' (known: sum, count, min, max, first, last, set, list, top, "
        "distinct_count, mean)",
    ),
    ('fields.x = { value = "{a}" }', "routes[0].fields.x.merge", "missing: one of sum, count"),
    (
        'fields.t = { value = "{a}", merge = "top", n = 3 }',
        "routes[0].fields.t.score",
        "missing: top ranks values by a score",
    ),
    (
        'fields.t = { value = "{a}", merge = "top", score = "{s}" }',
        "routes[0].fields.t.n",
        "missing: top keeps the n largest",
    ),
    (
        'fields.t = { value = "{a}", merge = "list", n = 0 }',
        "routes[0].fields.t.n",
        "expected a positive integer, got 0",
    ),
    (
        'fields.t = { value = "{a}", merge = "top", n = "3", score = "{s}" }',
        "routes[0].fields.t.n",
        "expected a positive integer, got '3'",
    ),
    (
        'fields.x = { value = "{a}", merge = "sum", n = 2 }',
        "routes[0].fields.x.n",
        "'n' applies to list and top only",
    ),
    (
        'fields.x = { value = "{a}", merge = "set", by = "{ts}" }',
        "routes[0].fields.x.by",
        "'by' applies to first and last and list only",
    ),
    (
        'fields.x = { value = "{a}", merge = "max", score = "{s}" }',
        "routes[0].fields.x.score",
        "'score' applies to top only",
    ),
    (
        'fields.x = { value = "abc", merge = "sum" }',
        "routes[0].fields.x.value",
        "'abc' is not a number",
    ),
    (
        'fields.x = { value = "user {a}", merge = "mean" }',
        "routes[0].fields.x.value",
        "template 'user {a}' yields text, not a number (use '{field}')",
    ),
    (
        'fields.x = { value = true, merge = "min" }',
        "routes[0].fields.x.value",
        "True is not a number",
    ),
    (
        'fields.t = { value = "{a}", merge = "top", n = 2, score = "s{s}" }',
        "routes[0].fields.t.score",
        "yields text, not a number",
    ),
    (
        'fields.x = { value = "{a}", merge = "last", by = "ts" }',
        "routes[0].fields.x.by",
        "expected '{field}' naming the event's time (a number), got 'ts'",
    ),
    ('fields.x = { merge = "sum" }', "routes[0].fields.x.value", "missing: the value to merge"),
    (
        'fields.x = { value = "{a}", merge = "sum", how = 1 }',
        "routes[0].fields.x.how",
        "unknown key 'how' (known: by, merge, n, score, value)",
    ),
    ('fields."a:b" = { merge = "count" }', "routes[0].fields.a:b", "cannot contain ':'"),
    ("fields = {}", "routes[0].fields", "at least one field is required"),
    (
        'fields.x = { merge = "count" }\ndoc = { x = 1 }',
        "routes[0].fields",
        "give 'doc' (sums) or 'fields' (strategies), not both",
    ),
    ("max_events = 0", "routes[0].max_events", "expected a positive integer, got 0"),
    ("ends_when = {}", "routes[0].ends_when", "empty: it would end every session"),
    ("ends_when = { kind = [] }", "routes[0].ends_when.kind", "an empty list matches nothing"),
    ('idle = "5x"', "routes[0].idle", "not a duration: '5x'"),
    (
        'idle = "5s"\nsoft_session = "5s"',
        "routes[0].idle",
        "'idle' and 'soft_session' are the same",
    ),
]


@pytest.mark.parametrize(("text", "key", "message"), CONFIG_ERRORS)
def test_config_errors_name_the_key(tmp_path: Path, text: str, key: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    base = (
        REC if "fields" in text or "ends_when" in text else REC + 'fields.x = { merge = "count" }\n'
    )
    path.write_text(base + text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert message in info.value.reason
    assert str(info.value).startswith(f"{path}: {key}: ")


SQL_ERRORS = [
    (
        SQL + 'fields.a = { value = "{a}", merge = "mean" }\n'
        'fields.a__sum = { value = "{a}", merge = "sum" }\n',
        "routes[0].fields.a__sum",
        "its column 'a__sum' collides with the column 'a__sum' of field 'a'",
    ),
    (
        SQL + 'fields.U = { merge = "count" }\n',
        "routes[0].fields.U",
        "its column 'U' collides with the spec key 'u'",
    ),
    (
        SQL.replace('spec = { u = "{u}" }\n', "") + 'fields.n = { merge = "count" }\n',
        "routes[0].spec",
        "missing",
    ),
    (
        SQL.replace("sqlite:///t.db", "mysql://x") + 'fields.n = { merge = "count" }\n',
        "routes[0].database",
        "expected sqlite:///PATH",
    ),
    (
        SQL.replace("sql:Aggregate", "sql:Counter") + 'fields.n = { merge = "count" }\n',
        "routes[0].update",
        "it must subclass phonon_cli.fields.strategies.Aggregate",
    ),
    (SQL, "routes[0].fields", "missing: 'phonon_cli.sinks.sql:Aggregate' aggregates declared"),
]


@pytest.mark.parametrize(("text", "key", "message"), SQL_ERRORS)
def test_sql_aggregate_route_errors(tmp_path: Path, text: str, key: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.key, message in info.value.reason) == (key, True), info.value


def test_route_attributes_from_config(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(
        SQL + fields_toml() + 'idle = "90s"\nmax_age = "1h"\nmax_events = 50\n'
        'ends_when = { event_type = "checkout", cart.items = [1, 2] }\n'
    )
    route = load_config(path).routes[0]
    assert [f.field for f in route.fields][:3] == [
        Field("revenue", "sum"),
        Field("events", "count"),
        Field("low", "min"),
    ]
    assert [f.field for f in route.fields if f.field.merge in ("list", "top")] == [
        Field("trail", "list", 3),
        Field("history", "list", 0),
        Field("biggest", "top", 2),
    ]
    assert (route.soft_session_s, route.hard_session_s, route.max_events) == (90.0, 3600.0, 50)
    by_name = {f.field.name: f for f in route.fields}
    assert by_name["entry"].key is not None and by_name["entry"].key.source == "{ts}"
    assert by_name["biggest"].key is not None and by_name["biggest"].key.source == "{amount}"
    assert by_name["pages"].key is None and by_name["pages"].value.source == "{page}"
    ends = route.ends_when
    assert ends is not None
    assert ends({"event_type": "checkout", "cart": {"items": 2}}) is True
    assert ends({"event_type": "checkout", "cart": {"items": 3}}) is False
    assert ends({"event_type": "view", "cart": {"items": 1}}) is False


def test_old_session_keys_still_work() -> None:
    route = route_of(soft_session="2m", hard_session="3m")
    assert (route.soft_session_s, route.hard_session_s, route.max_events, route.ends_when) == (
        120.0,
        180.0,
        None,
        None,
    )


# -- building an event's slots -------------------------------------------------------------


def test_build_makes_every_fields_slots() -> None:
    route = route_of()
    event = {"user": "u1", "amount": 7, "page": "/a", "ts": 5, "visitor": "v"}
    id_, spec, doc = route.build(event)
    registers = bytearray(1024)
    hll_add(registers, '"v"')
    assert (id_, spec) == ("u1", {"user": "u1"})
    assert doc == {
        "sum:revenue": 7,
        "cnt:events": 1,
        "min:low": 7,
        "max:high": 7,
        "first:entry": (5, '"/a"'),
        "last:exit": (5, '"/a"'),
        "set:pages": {'"/a"'},
        "list/3:trail": [(5, '"/a"')],
        "list/0:history": [(5, '"/a"')],
        "top/2:biggest": [(7, '"/a"')],
        "hll:visitors": registers,
        "msum:avg": 7,
        "mcnt:avg": 1,
    }


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (
            {"user": 1, "amount": "7", "page": "/", "ts": 1, "visitor": 1},
            "revenue is not a number: '7'",
        ),
        (
            {"user": 1, "amount": 7, "page": "/", "ts": "x", "visitor": 1},
            "entry time is not a number",
        ),
        ({"user": 1, "amount": 7, "page": "/", "ts": 1}, "missing field 'visitor'"),
        ({"user": 1, "amount": True, "page": "/", "ts": 1, "visitor": 1}, "is not a number: True"),
    ],
)
def test_wrong_types_are_event_errors(event: dict[str, Any], reason: str) -> None:
    route = route_of()
    with pytest.raises(EventError) as info:
        Router([route]).route(event)
    assert reason in str(info.value)


def test_timed_strategies_without_by_use_the_arrival_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([1000, 2000])
    monkeypatch.setattr(fieldconfig, "now_ms", lambda: next(clock))
    route = route_of(fields={"last_page": {"value": "{page}", "merge": "last"}})
    first = route.build({"user": 1, "page": "/b"})[2]
    second = route.build({"user": 1, "page": "/a"})[2]
    assert (first, second) == (
        {"last:last_page": (1000, '"/b"')},
        {"last:last_page": (2000, '"/a"')},
    )
    merged = merge_slot("last:last_page", second["last:last_page"], first["last:last_page"])
    assert Field("last_page", "last").result({"last:last_page": merged}) == "/a"


def test_reference_merge_matches_the_independent_computation() -> None:
    events = [
        {"user": "a", "amount": 5, "page": "/x", "ts": 2, "visitor": 1},
        {"user": "a", "amount": -3, "page": "/y", "ts": 2, "visitor": "1"},
        {"user": "a", "amount": 5, "page": "/w", "ts": 1, "visitor": 1},
        {"user": "a", "amount": 9, "page": "/x", "ts": 3, "visitor": 2},
    ]
    route = route_of()
    got = values(route, merged_doc(route, events)["a"])
    assert (
        got
        == expected(events)["a"]
        == {
            "revenue": 16,
            "events": 4,
            "low": -3,
            "high": 9,
            "entry": "/w",
            "exit": "/x",
            "pages": ["/w", "/x", "/y"],
            "trail": ["/x", "/y", "/x"],
            "history": ["/w", "/x", "/y", "/x"],
            "biggest": [[9, "/x"], [5, "/w"]],
            "visitors": 3,
            "avg": 4.0,
        }
    )


# -- the property: order, cache size and split do not matter --------------------------------

EVENT = st.fixed_dictionaries(
    {
        "user": st.sampled_from(["a", "b", "c"]),
        "amount": st.integers(-20, 20),
        "page": st.sampled_from(["/", "/a", "/b", "é", "x y", '"q"']),
        "ts": st.integers(0, 5),
        "visitor": st.one_of(st.integers(0, 6), st.sampled_from(["0", "v", "w"])),
    }
)
RUNS = itertools.count()
"""Each example gets keys of its own: the workers live across a test's examples."""


@pytest.fixture
def workers(make_process: Any) -> list[Any]:
    return [make_process() for _ in range(3)]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_aggregate_independent_of_order_cache_and_split(workers: list[Any], data: Any) -> None:
    route = route_of()
    run = next(RUNS)
    events = data.draw(st.lists(EVENT, min_size=1, max_size=30), label="events")
    events = [{**e, "user": f"{run}-{e['user']}"} for e in events]
    n = data.draw(st.integers(2, 3), label="workers")
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=n, max_size=n), label="cache sizes")
    split = data.draw(st.lists(st.integers(0, n - 1), min_size=len(events), max_size=len(events)))
    early = data.draw(st.lists(st.booleans(), min_size=len(events), max_size=len(events)))
    processes = workers[:n]
    caches = [LruCache(max_entries=m) for m in sizes]
    fields = [f.field for f in route.fields]
    Recorder.executed.clear()
    for event, w, expire in zip(events, split, early):
        ((_, id_, spec, doc),) = Router([route]).route(event)
        cache, process = caches[w], processes[w]
        fresh = id_ not in cache
        update = Recorder(
            process, id_, collection="s", spec=spec, doc=doc, fields=fields, acquire=fresh
        )
        cache.set(id_, update)
        if expire:
            cache.expire(id_)
    for cache in data.draw(st.permutations(caches), label="end order"):
        cache.expire_all()
    executed: dict[str, dict[str, Any]] = {}
    for resource, doc in Recorder.executed:
        into = executed.setdefault(resource.partition(":")[2], {})
        for slot, v in doc.items():
            into[slot] = merge_slot(slot, into[slot], v) if slot in into else v
    reference = merged_doc(route, events)
    assert executed == reference  # the slots themselves: HyperLogLog registers included
    truth = expected(events)
    for id_, doc in executed.items():
        got = values(route, doc)
        want = dict(truth[id_])
        assert abs(got.pop("visitors") - want.pop("visitors")) <= 1
        assert got == want


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    a=st.lists(EVENT, min_size=1, max_size=8),
    b=st.lists(EVENT, min_size=1, max_size=8),
)
def test_redis_merge_equals_python_merge(workers: list[Any], a: list[Any], b: list[Any]) -> None:
    """Two partials deposited in Redis (the second merged there by the Lua merge_field)
    equal the Python merge_slot of the two, slot by slot."""
    key = f"k{next(RUNS)}"
    route = route_of(id=key)
    fields = [f.field for f in route.fields]
    partials = [merged_doc(route, events)[key] for events in (a, b)]
    for process, doc in zip(workers, partials):
        Recorder(process, key, collection="s", doc=doc, fields=fields).cache()
    taken = Recorder(workers[2], key, collection="s", doc={}, fields=fields, init_cache=True)
    want = {s: merge_slot(s, partials[0][s], partials[1][s]) for s in partials[0]}
    assert taken.doc == want
    Recorder.executed.clear()
    assert taken.end_session() is True
    assert Recorder.executed == [(f"s:{key}", want)]


def test_hll_estimate_is_close_for_known_cardinalities() -> None:
    for n in (0, 1, 10, 100, 1000, 20000):
        registers = bytearray(1024)
        for i in range(n):
            hll_add(registers, orjson.dumps(i).decode())
        assert abs(hll_estimate(registers) - n) <= max(1, 0.08 * n), n
