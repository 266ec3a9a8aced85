"""A route's generated function behaves exactly like the route it was made from."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phonon_cli.config import Config
from phonon_cli.exceptions import EventError

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
