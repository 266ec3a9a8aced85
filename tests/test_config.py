"""Loading and validating configs: files written to tmp_path, no Redis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from phonon_cli import defaults
from phonon_cli.config import (
    CacheConfig,
    Config,
    StoreConfig,
    load_config,
    parse_duration,
)
from phonon_cli.core.update import ConflictFreeUpdate
from phonon_cli.exceptions import ConfigError
from phonon_cli.routing.routes import Router, Template

WIDGET_TOML = """\
[cache]
max_entries = 10000
soft_session = "15m"
hard_session = "30m"

[[routes]]
when = { event_type = ["clicks", "impressions"] }
update = "phonon_cli.update:ConflictFreeUpdate"
id = "{parent_post_id}.{target_post_id}"
collection = "widgets"
database = "sqlite:///widgets.db"
spec = { parent_post_id = "{parent_post_id}", target_post_id = "{target_post_id}" }
doc = { "{event_type}" = 1 }
"""

WIDGET_YAML = """\
cache:
  max_entries: 10000
  soft_session: 15m
  hard_session: 30m
routes:
  - when: {event_type: [clicks, impressions]}
    update: phonon_cli.update:ConflictFreeUpdate
    id: "{parent_post_id}.{target_post_id}"
    collection: widgets
    database: sqlite:///widgets.db
    spec:
      parent_post_id: "{parent_post_id}"
      target_post_id: "{target_post_id}"
    doc: {"{event_type}": 1}
"""

ROUTE = """
[[routes]]
update = "phonon_cli.update:ConflictFreeUpdate"
id = "{a}"
"""
"""The smallest valid route, appended to configs that test something else."""

ROUTE_KEYS = (
    "collection, database, doc, ends_when, fields, hard_session, id, idle, max_age, max_events, "
    "soft_session, spec, update, when"
)


def write(tmp_path: Path, text: str, name: str = "phonon.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == str(path)
    return str(info.value)


# -- valid configs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text"), [("w.toml", WIDGET_TOML), ("w.yaml", WIDGET_YAML), ("w.yml", WIDGET_YAML)]
)
def test_widget_config_loads(tmp_path: Path, name: str, text: str) -> None:
    path = write(tmp_path, text, name)
    config = load_config(path)
    assert config.path == str(path)
    assert config.store == StoreConfig(url=None, namespace=None)
    assert config.cache == CacheConfig(
        max_entries=10000, soft_session_s=900.0, hard_session_s=1800.0
    )
    (route,) = config.routes
    assert route.update is ConflictFreeUpdate
    assert route.update_path == "phonon_cli.update:ConflictFreeUpdate"
    assert route.id == Template("{parent_post_id}.{target_post_id}")
    assert route.when == {"event_type": ("clicks", "impressions")}
    assert route.collection == "widgets"
    assert route.database == "sqlite:///widgets.db"
    assert route.spec == {
        "parent_post_id": Template("{parent_post_id}"),
        "target_post_id": Template("{target_post_id}"),
    }
    assert route.doc == {Template("{event_type}"): Template(1)}
    assert (route.soft_session_s, route.hard_session_s) == (None, None)
    event = {"event_type": "impressions", "parent_post_id": 1, "target_post_id": 2}
    assert Router(config.routes).route(event) == [
        (route, "1.2", {"parent_post_id": 1, "target_post_id": 2}, {"impressions": 1})
    ]


def test_toml_and_yaml_give_equal_configs(tmp_path: Path) -> None:
    toml = load_config(write(tmp_path, WIDGET_TOML, "w.toml"))
    yaml = load_config(write(tmp_path, WIDGET_YAML, "w.yaml"))
    assert toml.routes == yaml.routes
    assert toml.cache == yaml.cache
    assert toml.store == yaml.store


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ROUTE))
    assert config.store == StoreConfig(url=None, namespace=None)
    assert config.cache == CacheConfig(
        max_entries=defaults.MAX_ENTRIES,
        soft_session_s=defaults.SOFT_SESSION_S,
        hard_session_s=defaults.HARD_SESSION_S,
    )
    (route,) = config.routes
    assert (route.when, route.spec, route.doc) == ({}, {}, {})
    assert (route.collection, route.database) == (None, None)


def test_store_and_per_route_sessions(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
[store]
url = "redis://:secret@localhost:6380/2"
namespace = "tenant1"

[cache]
soft_session = 90
hard_session = "1.5h"

[[routes]]
update = "phonon_cli.update.ConflictFreeUpdate"
id = "{a}"
soft_session = "500ms"
hard_session = "2m"
when = { payload.kind = "x", n = 3 }
""",
        )
    )
    assert config.store == StoreConfig(url="redis://:secret@localhost:6380/2", namespace="tenant1")
    assert (config.cache.soft_session_s, config.cache.hard_session_s) == (90.0, 5400.0)
    (route,) = config.routes
    assert route.update is ConflictFreeUpdate
    assert (route.soft_session_s, route.hard_session_s) == (0.5, 120.0)
    assert route.when == {"payload.kind": ("x",), "n": (3,)}
    assert route.matches({"payload": {"kind": "x"}, "n": 3}) is True
    assert route.matches({"payload": {"kind": "y"}, "n": 3}) is False


def test_from_mapping_validates_dicts() -> None:
    config = Config.from_mapping(
        {
            "routes": [
                {"update": "phonon_cli.update:ConflictFreeUpdate", "id": "{a}", "doc": {"n": "{n}"}}
            ]
        },
        "inline",
    )
    assert config.path == "inline"
    assert config.routes[0].build({"a": 1, "n": 2}) == ("1", {}, {"n": 2})
    with pytest.raises(ConfigError) as info:
        Config.from_mapping({"routes": []}, "inline")
    assert str(info.value) == "inline: routes: at least one route is required"


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("stor = {}\n" + ROUTE, "stor", "unknown key 'stor' (known: cache, routes, store)"),
        (
            '[store]\nuri = "x"\n' + ROUTE,
            "store.uri",
            "unknown key 'uri' (known: cluster, namespace, url)",
        ),
        (
            "[cache]\nsize = 1\n" + ROUTE,
            "cache.size",
            "unknown key 'size' (known: hard_session, max_entries, soft_session)",
        ),
        (
            ROUTE + 'colection = "w"\n',
            "routes[0].colection",
            f"unknown key 'colection' (known: {ROUTE_KEYS})",
        ),
        ("cache = [1]\n" + ROUTE, "cache", "expected a table, got list"),
        ('store = "redis://x"\n' + ROUTE, "store", "expected a table, got string"),
        (
            '[cache]\nsoft_session = "15x"\n' + ROUTE,
            "cache.soft_session",
            'not a duration: "15x" (use 90, 90s, 15m, 1h)',
        ),
        (
            "[cache]\nhard_session = -5\n" + ROUTE,
            "cache.hard_session",
            "a duration cannot be negative: -5",
        ),
        (
            "[cache]\nhard_session = true\n" + ROUTE,
            "cache.hard_session",
            "not a duration: true (use 90, 90s, 15m, 1h)",
        ),
        (
            '[cache]\nmax_entries = "10"\n' + ROUTE,
            "cache.max_entries",
            "expected an integer, got string",
        ),
        (
            "[cache]\nmax_entries = 1.5\n" + ROUTE,
            "cache.max_entries",
            "expected an integer, got float",
        ),
        ("[cache]\nmax_entries = 0\n" + ROUTE, "cache.max_entries", "must be at least 1, got 0"),
        (
            '[store]\nurl = "http://user:pw@h"\n' + ROUTE,
            "store.url",
            "expected a redis://, rediss:// or unix:// URL",
        ),
        ("[store]\nurl = 5\n" + ROUTE, "store.url", "expected a string, got integer"),
        (
            '[store]\nnamespace = "a b"\n' + ROUTE,
            "store.namespace",
            "invalid namespace 'a b' (no spaces, braces or glob characters)",
        ),
        ("[cache]\n", "routes", "missing: at least one [[routes]] entry is required"),
        ("routes = []\n", "routes", "at least one route is required"),
        ('routes = "x"\n', "routes", "expected a list of tables, got string"),
        ("routes = [1]\n", "routes[0]", "expected a table, got integer"),
        ('[[routes]]\nid = "x"\n', "routes[0].update", "missing required key 'update'"),
        (
            '[[routes]]\nupdate = "phonon_cli.update:ConflictFreeUpdate"\n',
            "routes[0].id",
            "missing required key 'id'",
        ),
        (
            ROUTE + ROUTE.replace('id = "{a}"', "id = 5"),
            "routes[1].id",
            "expected a string, got integer",
        ),
        (
            ROUTE.replace("phonon_cli.update:ConflictFreeUpdate", "foo.bar:Baz"),
            "routes[0].update",
            "cannot import 'foo.bar:Baz': No module named 'foo'",
        ),
        (
            ROUTE.replace("phonon_cli.update:ConflictFreeUpdate", "phonon_cli.update:Nope"),
            "routes[0].update",
            "cannot import 'phonon_cli.update:Nope': module 'phonon_cli.update' has no "
            "attribute 'Nope'",
        ),
        (
            ROUTE.replace("phonon_cli.update:ConflictFreeUpdate", "phonon_cli.process:Process"),
            "routes[0].update",
            "'phonon_cli.process:Process' is not a subclass of phonon_cli.Update",
        ),
        (
            ROUTE.replace("phonon_cli.update:ConflictFreeUpdate", "phonon_cli.defaults:HOME"),
            "routes[0].update",
            "'phonon_cli.defaults:HOME' is not a class",
        ),
        (
            ROUTE.replace("phonon_cli.update:ConflictFreeUpdate", "Update"),
            "routes[0].update",
            "not an import path: 'Update' (use module:Class)",
        ),
        (
            ROUTE.replace("phonon_cli.update:ConflictFreeUpdate", ""),
            "routes[0].update",
            "must not be empty",
        ),
        (ROUTE.replace('"{a}"', '"{a"'), "routes[0].id", "template '{a' has an unbalanced brace"),
        (
            ROUTE.replace('"{a}"', '"{}"'),
            "routes[0].id",
            "template '{}' has an empty placeholder '{}'",
        ),
        (
            ROUTE + 'doc = { "{a" = 1 }\n',
            "routes[0].doc.{a",
            "template '{a' has an unbalanced brace",
        ),
        (
            ROUTE + 'doc = { n = "x{a}" }\n',
            "routes[0].doc.n",
            "template 'x{a}' cannot yield a number (use '{field}')",
        ),
        (
            ROUTE + 'doc = { n = "one" }\n',
            "routes[0].doc.n",
            "template 'one' cannot yield a number (use '{field}')",
        ),
        (
            ROUTE + "doc = { n = true }\n",
            "routes[0].doc.n",
            "expected a number or '{field}', got boolean",
        ),
        (ROUTE + "doc = [1]\n", "routes[0].doc", "expected a table, got list"),
        (
            ROUTE + "spec = { s = [1] }\n",
            "routes[0].spec.s",
            "expected a template or a constant, got list",
        ),
        (
            ROUTE + 'spec = { s = "{a}}" }\n',
            "routes[0].spec.s",
            "template '{a}}' has an unbalanced brace",
        ),
        (ROUTE + 'when = "x"\n', "routes[0].when", "expected a table, got string"),
        (ROUTE + "when = { t = [] }\n", "routes[0].when.t", "an empty list matches nothing"),
        (
            ROUTE + "when = { t = [[1]] }\n",
            "routes[0].when.t",
            "expected a string, number, boolean or a list of them, got list",
        ),
        (
            ROUTE + 'soft_session = "soon"\n',
            "routes[0].soft_session",
            'not a duration: "soon" (use 90, 90s, 15m, 1h)',
        ),
        (ROUTE + "collection = 3\n", "routes[0].collection", "expected a string, got integer"),
    ],
)
def test_config_errors_name_file_key_and_reason(
    tmp_path: Path, text: str, key: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.path, info.value.key) == (str(path), key)
    assert str(info.value) == f"{path}: {key}: {message}"


def test_password_is_not_repeated_in_url_errors(tmp_path: Path) -> None:
    message = load_error(write(tmp_path, '[store]\nurl = "http://user:hunter2@h"\n' + ROUTE))
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "bad.toml",
            "[cache]\nmax_entries = 10\nsoft_session = 15m\n",
            "invalid TOML at line 3: Expected newline or end of document after a statement",
        ),
        (
            "bad.toml",
            "a = 1\n[x\n",
            "invalid TOML at line 2: Expected ']' at the end of a table declaration",
        ),
        (
            "bad.yaml",
            "cache:\n  max_entries: 10\n routes: [\n",
            "invalid YAML at line 3: while parsing a block mapping: expected <block end>, "
            "but found '<block mapping start>'",
        ),
        (
            "dup.yaml",
            "cache: {}\nroutes: []\ncache: {}\n",
            "invalid YAML at line 3: duplicate key 'cache'",
        ),
        ("list.yaml", "- 1\n", "expected a table, got list"),
        ("empty.yaml", "", "routes: missing: at least one [[routes]] entry is required"),
        ("w.json", "{}", "unknown config format (use a .toml, .yaml or .yml file)"),
        ("latin1.toml", "a = '\xe9'\n", "not UTF-8 text: invalid continuation byte at byte 5"),
    ],
)
def test_file_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))
    assert load_error(path) == f"{path}: {message}"


def test_missing_file(tmp_path: Path) -> None:
    assert load_error(tmp_path / "nope.toml") == f"{tmp_path / 'nope.toml'}: no such file"


def test_yaml_routes_are_numbered_from_zero(tmp_path: Path) -> None:
    text = WIDGET_YAML + "  - update: phonon_cli.update:ConflictFreeUpdate\n    id: 7\n"
    path = write(tmp_path, text, "w.yaml")
    assert load_error(path) == f"{path}: routes[1].id: expected a string, got integer"


# -- durations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        (0, 0.0),
        ("90", 90.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("500ms", 0.5),
        (".5m", 30.0),
        (" 2m ", 120.0),
        ("10 s", 10.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration(value: Any, seconds: float) -> None:
    assert parse_duration(value) == seconds
    assert type(parse_duration(value)) is float


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("15x", 'not a duration: "15x" (use 90, 90s, 15m, 1h)'),
        ("", 'not a duration: "" (use 90, 90s, 15m, 1h)'),
        ("m", 'not a duration: "m" (use 90, 90s, 15m, 1h)'),
        ("1h30m", 'not a duration: "1h30m" (use 90, 90s, 15m, 1h)'),
        ("15M", 'not a duration: "15M" (use 90, 90s, 15m, 1h)'),
        ("-5s", "a duration cannot be negative: '-5s'"),
        (-1, "a duration cannot be negative: -1"),
        (-0.5, "a duration cannot be negative: -0.5"),
        (float("inf"), "not a duration: inf (use 90, 90s, 15m, 1h)"),
        (float("nan"), "not a duration: nan (use 90, 90s, 15m, 1h)"),
        (True, "not a duration: true (use 90, 90s, 15m, 1h)"),
        (None, "not a duration: null (use 90, 90s, 15m, 1h)"),
        ([1], "not a duration: [1] (use 90, 90s, 15m, 1h)"),
    ],
)
def test_parse_duration_rejects(value: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) == message


def test_environment_variables_in_any_string(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PHONON_TEST_DB_PASSWORD", "s3cret")
    monkeypatch.delenv("PHONON_TEST_UNSET", raising=False)
    path = write(
        tmp_path,
        """\
[store]
url = "redis://:${PHONON_TEST_DB_PASSWORD}@localhost:6380/${PHONON_TEST_UNSET:-2}"
namespace = "cost$$-${PHONON_TEST_UNSET:-}"

[[routes]]
update = "phonon_cli.update:ConflictFreeUpdate"
id = "{a}"
""",
    )
    config = load_config(path)
    assert config.store.url == "redis://:s3cret@localhost:6380/2"
    assert config.store.namespace == "cost$-"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("${PHONON_TEST_UNSET}", "environment variable PHONON_TEST_UNSET is not set"),
        ("${PHONON_TEST_UNSET", "malformed variable '${PHONON_TEST_UNSET'"),
    ],
)
def test_a_missing_variable_names_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.delenv("PHONON_TEST_UNSET", raising=False)
    path = write(
        tmp_path,
        f'[[routes]]\nupdate = "phonon_cli.update:ConflictFreeUpdate"\nid = "{{a}}"\n'
        f'database = "{value}"\n',
    )
    assert load_error(path).startswith(f"{path}: routes[0].database: {message}")
