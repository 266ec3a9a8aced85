"""Templates, filters, routes and the router: pure functions of an event, no Redis."""

from __future__ import annotations

from typing import Any

import pytest

from phonon_cli.core.update import ConflictFreeUpdate
from phonon_cli.exceptions import EventError
from phonon_cli.routing.routes import Route, Router, Template

WIDGET_EVENT = {"event_type": "clicks", "parent_post_id": 12, "target_post_id": 34, "user": "u"}


def make_route(
    id: str = "{parent_post_id}.{target_post_id}",
    when: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
    doc: dict[str, Any] | None = None,
    collection: str | None = "widgets",
) -> Route:
    """A route as the config would build it, templates compiled."""
    return Route(
        update=ConflictFreeUpdate,
        update_path="phonon_cli.update:ConflictFreeUpdate",
        id=Template(id),
        when=when or {},
        collection=collection,
        spec={name: Template(source) for name, source in (spec or {}).items()},
        doc={Template(k): Template(v) for k, v in (doc or {}).items()},
    )


def widget_route() -> Route:
    return make_route(
        when={"event_type": ("clicks", "impressions")},
        spec={"parent_post_id": "{parent_post_id}", "target_post_id": "{target_post_id}"},
        doc={"{event_type}": 1},
    )


# -- templates ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected_type"),
    [
        (12, int),
        (1.5, float),
        ("x", str),
        ({"k": [1, 2]}, dict),
        ([1], list),
        (True, bool),
        (None, type(None)),
    ],
)
def test_whole_field_template_keeps_the_json_type(value: Any, expected_type: type) -> None:
    rendered = Template("{a}").render({"a": value})
    assert rendered == value
    assert type(rendered) is expected_type


@pytest.mark.parametrize(
    ("source", "event", "expected"),
    [
        ("{a}.{b}", {"a": 12, "b": 34}, "12.34"),
        ("post-{a}", {"a": 7}, "post-7"),
        ("{a}/", {"a": "x"}, "x/"),
        ("{a}{b}", {"a": "x", "b": "y"}, "xy"),
        ("{a.b}-{c}", {"a": {"b": 1}, "c": 2}, "1-2"),
        ("{a}:{b}:{c}", {"a": True, "b": False, "c": 1.5}, "true:false:1.5"),
        ("{{literal}}", {}, "{literal}"),
        ("{{{a}}}", {"a": 5}, "{5}"),
        ("a}}b{{c", {}, "a}b{c"),
        ("no fields", {}, "no fields"),
    ],
)
def test_text_around_placeholders_makes_a_string(
    source: str, event: dict[str, Any], expected: str
) -> None:
    assert Template(source).render(event) == expected
    assert Template(source).text(event) == expected


@pytest.mark.parametrize("source", ["{a}", "x-{a}", "{a}{b}", "{n.a}", "x-{n.a}"])
@pytest.mark.parametrize(
    ("value", "kind"), [(None, "null"), ({"x": 1}, "an object"), ([1], "a list")]
)
def test_a_key_made_of_a_null_object_or_list_is_refused(source: str, value: Any, kind: str) -> None:
    event = {"a": value, "b": "b", "n": {"a": value}}
    with pytest.raises(EventError, match=f"is {kind}: a key or column name needs a scalar"):
        Template(source).text(event)


def test_nested_field_reaches_into_objects() -> None:
    event = {"a": {"b": {"c": 3}}}
    assert Template("{a.b.c}").render(event) == 3
    assert Template("{a.b}").render(event) == {"c": 3}


def test_text_of_a_whole_field_is_its_json_spelling() -> None:
    assert Template("{a}").text({"a": 7}) == "7"
    assert Template("{a}").text({"a": False}) == "false"
    assert Template("{a}").text({"a": "s"}) == "s"


def test_non_string_source_is_a_constant() -> None:
    template = Template(1)
    assert template.render({}) == 1
    assert template.text({}) == "1"
    assert template.is_constant
    assert Template(2.5).render({"a": 1}) == 2.5


@pytest.mark.parametrize(
    ("source", "event", "missing"),
    [
        ("{a}", {}, "a"),
        ("{a}.{b}", {"a": 1}, "b"),
        ("x{a}", {"b": 1}, "a"),
        ("{a.b}", {"a": {}}, "a.b"),
        ("{a.b}", {"a": 5}, "a.b"),
        ("{a.b}", {"a": "text"}, "a.b"),
        ("{a.b}.{c}", {"a": [1]}, "a.b"),
        ("{a.b}.{c}", {"a": {"b": 1}}, "c"),
    ],
)
def test_missing_field_raises_event_error_naming_it(
    source: str, event: dict[str, Any], missing: str
) -> None:
    with pytest.raises(EventError) as info:
        Template(source).render(event)
    assert str(info.value) == f"missing field '{missing}'"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{a", "template '{a' has an unbalanced brace"),
        ("a}", "template 'a}' has an unbalanced brace"),
        ("{a{b}}", "template '{a{b}}' has an unbalanced brace"),
        ("{}", "template '{}' has an empty placeholder '{}'"),
        ("x{}y", "template 'x{}y' has an empty placeholder '{}'"),
        ("{a..b}", "template '{a..b}' has an empty field name in {a..b}"),
        ("{.a}", "template '{.a}' has an empty field name in {.a}"),
    ],
)
def test_malformed_template_is_a_value_error(source: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        Template(source)
    assert str(info.value) == message


def test_templates_compare_by_source() -> None:
    assert Template("{a}") == Template("{a}")
    assert hash(Template("{a}")) == hash(Template("{a}"))
    assert Template("{a}") != Template("{b}")
    assert Template(1) != Template("1")
    assert Template("{a.b}").fields == ("a.b",)
    assert Template("{a}-{b.c}").fields == ("a", "b.c")


# -- when -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "event", "expected"),
    [
        ({"t": ("clicks",)}, {"t": "clicks"}, True),
        ({"t": ("clicks",)}, {"t": "views"}, False),
        ({"t": "clicks"}, {"t": "clicks"}, True),  # a bare value, as a hand-built Route may have
        ({"t": ("clicks", "impressions")}, {"t": "impressions"}, True),
        ({"t": ("clicks", "impressions")}, {"t": "views"}, False),
        ({"t": ("clicks", "impressions")}, {"t": ["clicks"]}, False),  # unhashable, no crash
        ({"t": ("clicks",)}, {}, False),  # missing field: no match, no error
        ({"t": ("clicks", "views")}, {}, False),
        ({"t": (None,)}, {}, False),  # missing is not null
        ({"t": (None,)}, {"t": None}, True),
        ({"n": (1, 2)}, {"n": 2}, True),
        ({"n": (1,)}, {"n": 1.0}, True),
        ({"n": (1,)}, {"n": True}, False),  # JSON true is not 1
        ({"f": (True,)}, {"f": 1}, False),
        ({"f": (True,)}, {"f": True}, True),
        ({"n": (1, "1")}, {"n": "1"}, True),
        ({"a.b": ("x",)}, {"a": {"b": "x"}}, True),
        ({"a.b": ("x",)}, {"a": {"b": "y"}}, False),
        ({"a.b": ("x",)}, {"a": "x"}, False),
        ({"a.b": ("x", "y")}, {"a": {}}, False),
        ({"a.b": (1,)}, {"a": {"b": 1}}, True),
        ({"t": ("c",), "u": ("x",)}, {"t": "c", "u": "x"}, True),
        ({"t": ("c",), "u": ("x",)}, {"t": "c", "u": "y"}, False),
        ({"t": ("c",), "u": ("x",)}, {"t": "c"}, False),
        ({}, {"anything": 1}, True),
    ],
)
def test_when_filter(when: dict[str, Any], event: dict[str, Any], expected: bool) -> None:
    assert make_route(when=when).matches(event) is expected


# -- build ----------------------------------------------------------------------------


def test_widget_route_builds_id_spec_and_doc() -> None:
    route = widget_route()
    assert route.build(WIDGET_EVENT) == (
        "12.34",
        {"parent_post_id": 12, "target_post_id": 34},
        {"clicks": 1},
    )


def test_id_is_always_a_string() -> None:
    route = make_route(id="{n}")
    assert route.build({"n": 7}) == ("7", {}, {})


def test_doc_value_template_yields_the_number() -> None:
    route = make_route(id="x", doc={"clicks": "{n}", "seconds": "{t.s}"})
    assert route.build({"n": 3, "t": {"s": 0.5}}) == ("x", {}, {"clicks": 3, "seconds": 0.5})


def test_spec_mixes_fields_and_constants() -> None:
    route = make_route(id="x", spec={"kind": "widget", "n": "{n}", "deep": "{a.b}", "one": 1})
    assert route.build({"n": 5, "a": {"b": "c"}}) == (
        "x",
        {"kind": "widget", "n": 5, "deep": "c", "one": 1},
        {},
    )


@pytest.mark.parametrize(
    ("value", "shown"), [("x", '"x"'), (True, "true"), (None, "null"), ([1], "[1]")]
)
def test_non_numeric_doc_value_is_an_event_error(value: Any, shown: str) -> None:
    route = make_route(id="x", doc={"{event_type}": "{n}"})
    with pytest.raises(EventError) as info:
        route.build({"event_type": "clicks", "n": value})
    assert str(info.value) == f"doc value for 'clicks' is not a number: {shown}"


@pytest.mark.parametrize(
    ("route", "missing"),
    [
        (make_route(id="{a.y}.{b}"), "b"),
        (make_route(id="x", spec={"s": "{b}"}), "b"),
        (make_route(id="x", spec={"s": "{a.z}"}), "a.z"),
        (make_route(id="x", doc={"{b}": 1}), "b"),
        (make_route(id="x", doc={"n": "{b}"}), "b"),
        (make_route(id="x", doc={"{b}": 1, "n": 1}), "b"),
    ],
)
def test_missing_field_in_build_names_it(route: Route, missing: str) -> None:
    with pytest.raises(EventError) as info:
        route.build({"a": {"y": 1}})
    assert str(info.value) == f"missing field '{missing}'"


def test_doc_keys_that_render_alike_are_summed() -> None:
    route = make_route(id="x", doc={"{kind}": 1, "total": 2, "{other}": "{n}"})
    assert route.build({"kind": "total", "other": "o", "n": 4}) == ("x", {}, {"total": 3, "o": 4})
    assert route.build({"kind": "k", "other": "k", "n": 4}) == ("x", {}, {"k": 5, "total": 2})


def test_doc_with_several_constant_keys() -> None:
    route = make_route(id="x", doc={"a": 1, "b": "{n}"})
    assert route.build({"n": 2}) == ("x", {}, {"a": 1, "b": 2})


def test_doc_key_from_a_non_string_field_is_its_text() -> None:
    route = make_route(id="x", doc={"{code}": 1})
    assert route.build({"code": 404}) == ("x", {}, {"404": 1})


def test_build_returns_fresh_dicts() -> None:
    """Updates keep the dicts they are given; two events must not share one."""
    route = widget_route()
    first, second = route.build(WIDGET_EVENT), route.build(WIDGET_EVENT)
    assert first[1] is not second[1]
    assert first[2] is not second[2]


# -- router ---------------------------------------------------------------------------


def test_router_returns_every_matching_route_in_order() -> None:
    clicks = widget_route()
    everything = make_route(id="{user}", doc={"events": 1}, collection="users")
    views = make_route(when={"event_type": ("views",)}, id="{user}")
    router = Router([clicks, views, everything])
    assert router.route(WIDGET_EVENT) == [
        (clicks, "12.34", {"parent_post_id": 12, "target_post_id": 34}, {"clicks": 1}),
        (everything, "u", {}, {"events": 1}),
    ]
    assert router.route({"event_type": "views", "user": "v"}) == [
        (views, "v", {}, {}),
        (everything, "v", {}, {"events": 1}),
    ]


def test_router_with_no_match_returns_empty_list() -> None:
    router = Router([widget_route()])
    assert router.route({"event_type": "views"}) == []


def test_router_raises_for_a_matching_route_that_cannot_be_built() -> None:
    # The first route is fine; the second matches but lacks its field: the whole
    # event is an error (dead-lettered), not half-routed.
    router = Router([widget_route(), make_route(id="{missing}")])
    with pytest.raises(EventError) as info:
        router.route(WIDGET_EVENT)
    assert str(info.value) == "missing field 'missing'"


def test_router_ignores_fields_of_routes_that_do_not_match() -> None:
    router = Router([make_route(when={"event_type": ("views",)}, id="{missing}")])
    assert router.route(WIDGET_EVENT) == []


def test_routes_are_hashable_and_compare_by_value() -> None:
    assert widget_route() == widget_route()
    assert hash(widget_route()) == hash(widget_route())
    assert widget_route() != make_route()
