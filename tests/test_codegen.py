"""A route's generated function behaves exactly like the route it was made from."""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from phonon_cli.config import Config
from phonon_cli.exceptions import EventError
from phonon_cli.fields.aggregate import merge_event_for
from phonon_cli.fields.strategies import encode_slot
from phonon_cli.routing import fields as routing_fields

ROUTES = [
    # the widget route: string filter, joined id, whole-field spec, counting doc
    {
        "when": {"event_type": ["clicks", "impressions"]},
        "id": "{p}.{t}",
        "spec": {"p": "{p}", "t": "{t}"},
        "doc": {"{event_type}": 1},
    },
    # nested fields, a non-string filter, a templated doc value
    {
        "when": {"a.b": [1, True]},
        "id": "{a.b}-{t}",
        "spec": {"x": "{a.b}", "t": "{t}"},
        "doc": {"n": "{t}"},
    },
    # no filter, a constant id, two doc keys
    {"id": "all", "doc": {"{p}": 1, "total": 1}},
    # an id of one whole field (keeps JSON spelling in text), empty spec
    {"when": {"event_type": "clicks"}, "id": "{p}", "doc": {"c": 2}},
]

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(-2, 2, allow_nan=False),
    st.sampled_from(["clicks", "impressions", "x", "a.b"]),
    st.lists(st.integers(0, 2), max_size=2),
)
events = st.dictionaries(
    st.sampled_from(["p", "t", "event_type", "a"]),
    st.one_of(values, st.dictionaries(st.just("b"), values, max_size=1)),
)


def outcome(call: Any) -> Any:
    try:
        return ("ok", call())
    except EventError as e:
        return ("error", str(e))


@pytest.mark.parametrize("table", ROUTES)
@settings(max_examples=300, deadline=None)
@given(event=events)
def test_generated_route_matches_the_route(table: dict, event: dict) -> None:
    (route,) = Config.from_mapping(
        {"routes": [{"update": "phonon_cli.update:ConflictFreeUpdate", **table}]}
    ).routes
    expected = outcome(lambda: (route, *route.build(event)) if route.matches(event) else None)
    assert outcome(lambda: route._fused(event)) == expected


@pytest.mark.parametrize("table", ROUTES)
@settings(max_examples=300, deadline=None)
@given(event=events)
def test_merger_of_a_cached_key_merges_what_the_route_builds(table: dict, event: dict) -> None:
    """The run loop's path for cached keys: same match, same errors, the same doc summed in,
    and the key marked most recent; a key not cached is left to the general path."""
    (route,) = Config.from_mapping(
        {"routes": [{"update": "phonon_cli.update:ConflictFreeUpdate", **table}]}
    ).routes
    expected = outcome(lambda: route.build(event) if route.matches(event) else None)
    cache: dict[str, Any] = {}
    touched: list[str] = []
    merge = route.merger(cache.get, touched.append)
    assert merge is not None
    if expected[1] is None:
        assert outcome(lambda: merge(event, 5)) == expected
        return
    if expected[0] == "error":  # the same error, or one in the doc: left to the general path
        assert outcome(lambda: merge(event, 5)) in (expected, ("ok", False))
        return
    id_, _, doc = expected[1]
    assert merge(event, 5) is False  # not cached
    cached = SimpleNamespace(doc={"seen": 1}, events=1, touched_ms=0)
    cache[id_] = cached
    assert merge(event, 7) is cached
    want = Counter({"seen": 1})
    want.update(doc)
    assert cached.doc == dict(want)
    assert (cached.events, cached.touched_ms, touched) == (2, 7, [id_])


def test_a_class_whose_merge_needs_an_update_has_no_merger() -> None:
    (route,) = Config.from_mapping(
        {"routes": [{"update": "widgets:WidgetUpdate", "id": "{p}", "doc": {"n": 1}}]}
    ).routes
    assert route.merger({}.get, print) is None


# -- routes with fields: the merge written into the merger ----------------------------------

FIELD_ROUTES = [
    # every strategy; fields read by the filter, the id and the spec too (reused locals)
    {
        "when": {"event_type": ["clicks", "impressions"]},
        "id": "{p}",
        "spec": {"p": "{p}"},
        "fields": {
            "n": {"merge": "count"},
            "total": {"value": "{t}", "merge": "sum"},
            "low": {"value": "{t}", "merge": "min"},
            "high": {"value": "{t}", "merge": "max"},
            "avg": {"value": "{t}", "merge": "mean"},
            "entry": {"value": "{event_type}", "merge": "first", "by": "{t}"},
            "exit": {"value": "{a}", "merge": "last", "by": "{t}"},
            "kinds": {"value": "{event_type}", "merge": "set"},
            "trail": {"value": "{p}", "merge": "list", "n": 2, "by": "{t}"},
            "best": {"value": "{a}", "merge": "top", "n": 2, "score": "{t}"},
            "seen": {"value": "{a}", "merge": "distinct_count"},
        },
    },
    # a value checked under a test of two values (a and t), then under one (t)
    {
        "id": "{p}",
        "fields": {
            "best": {"value": "{a}", "merge": "top", "n": 1, "score": "{t}"},
            "total": {"value": "{t}", "merge": "sum"},
        },
    },
    # optional and strict fields, nested paths, a text template, no filter
    {
        "id": "{p}",
        "fields": {
            "sum_a": {"value": "{a.b}", "merge": "sum", "optional": True},
            "strict": {"value": "{t}", "merge": "max", "nulls": "dead-letter"},
            "label": {"value": "{p}-{event_type}", "merge": "set"},
            "late": {"value": "{a}", "merge": "last"},
            "hl": {"value": "{t}", "merge": "distinct_count", "optional": True},
        },
    },
]
BIG = 2**63 - 2
field_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([BIG, -BIG, 2**63]),  # the last: outside int64 (orjson still reads it)
    st.floats(-2, 2, allow_nan=False),
    st.sampled_from(["clicks", "impressions", "x"]),
)
field_events = st.dictionaries(
    st.sampled_from(["p", "t", "event_type", "a"]),
    st.one_of(field_values, st.dictionaries(st.just("b"), field_values, max_size=1)),
)


def fields_route(table: dict) -> Any:
    (route,) = Config.from_mapping(
        {"routes": [{"update": "phonon_cli.sinks.jsonl:AggregateLines", **table}]}
    ).routes
    return route


def general(route: Any, doc: dict, event: dict) -> Any:
    """The general path: the route's items, merged by the class's generated merge."""
    _, _, items = route.build(event)
    merge_event_for(route.declared)(doc, items)


@pytest.mark.parametrize("table", FIELD_ROUTES)
@settings(max_examples=300, deadline=None)
@given(before=st.lists(field_events, max_size=4), event=field_events)
@example(before=[{"p": 1, "t": BIG, "a": 1}], event={"p": 1, "t": BIG, "a": None})  # refused
def test_fields_merger_merges_what_the_general_path_merges(
    table: dict, before: list[dict], event: dict
) -> None:
    """For a cached key whose slots earlier events made: the same doc, the same error
    (an event refused merges nothing), the same nulls counted; and the lines merger
    takes the same lines the same way."""
    with pytest.MonkeyPatch.context() as mp:  # the arrival clock of "last" without "by"
        mp.setattr(routing_fields, "now_ms", lambda: 1_000)
        route = fields_route(table)
        check_fields_merger(route, before, event)


def check_fields_merger(route: Any, before: list[dict], event: dict) -> None:
    skipped = route.fields[0].skipped
    want: dict[str, Any] = {}
    for e in before:
        with contextlib.suppress(EventError):
            general(route, want, e)
    got, lines_doc = copy.deepcopy(want), copy.deepcopy(want)
    nulls = skipped.n
    expected = outcome(lambda: general(route, want, event) if route.matches(event) else "skip")
    # Nulls count for an event merged, not for one refused (the general path counts
    # them before a sum is found out of range: a known difference, not copied here).
    want_nulls = 0 if expected[0] == "error" else skipped.n - nulls

    def cached(doc: dict) -> Any:
        return SimpleNamespace(doc=doc, events=1, touched_ms=0)

    u = cached(got)
    merge = route.merger(lambda i: u, lambda i: None)
    nulls = skipped.n
    result = outcome(lambda: merge(event, 7))
    if expected == ("ok", "skip"):
        assert result == ("ok", None)
    elif expected[0] == "error":
        assert result == expected
    else:
        assert result == ("ok", u)
    assert (skipped.n - nulls, encoded(u.doc), u.events) == (
        want_nulls,
        encoded(want),
        1 + (expected == ("ok", None)),
    )
    v = cached(lines_doc)
    merge_lines = route.lines_merger(lambda i: v, lambda i: None)
    nulls = skipped.n
    stop, unmatched, _ = merge_lines([orjson.dumps(event)], 0, 7)
    took = expected == ("ok", None)
    assert (stop, unmatched) == ((1, 0) if took else (0, 0) if expected[0] == "error" else (1, 1))
    assert (skipped.n - nulls, encoded(v.doc), v.events) == (want_nulls, encoded(want), 1 + took)


def encoded(doc: dict) -> dict[str, str]:
    return {slot: encode_slot(slot, v) for slot, v in doc.items()}


def test_a_value_is_checked_even_where_a_null_skipped_its_first_check() -> None:
    """``t`` is checked first by ``best`` (as its score), which a null ``a`` skips: the
    sum checks it again, so a string is refused, not summed."""
    route = fields_route(FIELD_ROUTES[1])
    with pytest.raises(EventError, match="total is not a number"):
        route.build({"p": 1, "t": "x", "a": None})
    u = SimpleNamespace(doc={}, events=1, touched_ms=0)
    merge = route.merger(lambda i: u, lambda i: None)
    with pytest.raises(EventError, match="total is not a number"):
        merge({"p": 1, "t": "x", "a": None}, 7)
    assert u.doc == {}
