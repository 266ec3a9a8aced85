"""A route's generated function behaves exactly like the route it was made from."""

from __future__ import annotations

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
