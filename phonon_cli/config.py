"""Load and validate a phonon config (TOML or YAML, one schema).

Everything that can be wrong with a config is found here, at load time, and
reported as a ``ConfigError`` naming the file, the key (``routes[0].doc``) and
what is wrong, so that ``phonon check`` and ``phonon run`` fail before the first
event rather than on it. Update classes are imported here too, for the same
reason: a typo in an import path must not wait for a matching event.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from . import defaults
from .core.update import Update
from .exceptions import ConfigError
from .fields.aggregate import FieldsUpdate
from .poison import bad_number, short
from .routing.fields import parse_fields
from .routing.filters import Scalar, matcher
from .routing.routes import Route, Template
from .store.keys import Keys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "CacheConfig",
    "Config",
    "StoreConfig",
    "load_config",
    "parse_duration",
    "resolve_update",
]

# -- durations ------------------------------------------------------------------------

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?")
_DURATION_HINT = "(use 90, 90s, 15m, 1h)"


def parse_duration(value: Any) -> float:
    """Seconds in a duration as users write it: ``90``, ``90s``, ``15m``, ``1h``,
    ``1.5h``, ``500ms``, or a number of seconds.

    Args:
        value: a string as above, or an int/float number of seconds.

    Returns:
        The duration in seconds.

    Raises:
        ValueError: not a duration, or a negative one.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"not a duration: {short(value)} {_DURATION_HINT}")
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match is None:
            if value.strip().startswith("-"):
                raise ValueError(f"a duration cannot be negative: {value!r}")
            raise ValueError(f"not a duration: {short(value)} {_DURATION_HINT}")
        number, unit = match.groups()
        return float(number) * _UNITS[unit or "s"]
    if not math.isfinite(value):
        raise ValueError(f"not a duration: {short(value)} {_DURATION_HINT}")
    if value < 0:
        raise ValueError(f"a duration cannot be negative: {value!r}")
    return float(value)


# -- import paths ---------------------------------------------------------------------


def resolve_update(import_path: str) -> type[Update]:
    """The ``Update`` subclass named by ``module:Class`` (or ``module.Class``).

    Args:
        import_path: where the class lives; ``module:Outer.Inner`` also works.

    Returns:
        The class.

    Raises:
        ValueError: the path is malformed, cannot be imported, or does not name
            an ``Update`` subclass. The message says which.
    """
    if ":" in import_path:
        module_name, _, attr_path = import_path.partition(":")
    else:
        module_name, _, attr_path = import_path.rpartition(".")
    if not module_name or not attr_path:
        raise ValueError(f"not an import path: {import_path!r} (use module:Class)")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {import_path!r}: {e}") from e
    except Exception as e:  # the module's own code failed: say so, it is still the config's key
        raise ValueError(f"cannot import {import_path!r}: {type(e).__name__}: {e}") from e
    for name in attr_path.split("."):
        try:
            target = getattr(target, name)
        except AttributeError as e:
            raise ValueError(f"cannot import {import_path!r}: {e}") from e
    if not isinstance(target, type):
        raise ValueError(f"{import_path!r} is not a class")
    if not issubclass(target, Update):
        raise ValueError(f"{import_path!r} is not a subclass of phonon_cli.Update")
    return target


# -- the config -----------------------------------------------------------------------


@dataclass(frozen=True)
class StoreConfig:
    """Where Redis is. None: the command line, the environment, then the default decide."""

    url: str | None = None
    namespace: str | None = None
    cluster: bool | None = None
    """``url`` names a node of a Redis Cluster."""


@dataclass(frozen=True)
class CacheConfig:
    """The local LRU cache and how long a key's session lasts (seconds)."""

    max_entries: int = defaults.MAX_ENTRIES
    soft_session_s: float = defaults.SOFT_SESSION_S
    hard_session_s: float = defaults.HARD_SESSION_S


@dataclass(frozen=True)
class Config:
    """A validated config: every template compiled and every class imported."""

    path: str
    store: StoreConfig = field(default_factory=StoreConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    routes: tuple[Route, ...] = ()

    @classmethod
    def from_mapping(cls, data: Any, path: str = "<config>") -> Config:
        """Validate an already parsed config (what TOML or YAML gave).

        Args:
            data: the parsed document; a mapping, or ``None`` for an empty file.
            path: the file it came from, for error messages.

        Returns:
            The config.

        Raises:
            ConfigError: naming ``path``, the key at fault and what is wrong.
        """
        return _Validator(path).config(expand_variables(data, path, os.environ))


_VARIABLE = re.compile(r"\$(\$)|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{([^}]*)\}?")


def expand_variables(data: Any, path: str, environ: Mapping[str, str], key: str = "") -> Any:
    """``${VAR}`` and ``${VAR:-default}`` replaced in every string value, so secrets
    (a database password) can stay out of the file; ``$$`` is a literal ``$``.

    Expanded after parsing, value by value, so a variable can never change the
    file's structure (no TOML or YAML injected through the environment).

    Raises:
        ConfigError: a variable that is not set and has no default, or a malformed
            reference, naming the file and the key.
    """
    if isinstance(data, str):
        if "$" not in data:
            return data

        def one(m: re.Match[str]) -> str:
            if m.group(1):
                return "$"
            name, default = m.group(2), m.group(3)
            if name is None:
                raise ConfigError(
                    f"malformed variable {m.group(0)!r}: use ${{NAME}} or ${{NAME:-default}}",
                    path=path,
                    key=key or None,
                )
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            raise ConfigError(
                f"environment variable {name} is not set (give it, or a default: "
                f"${{{name}:-default}})",
                path=path,
                key=key or None,
            )

        return _VARIABLE.sub(one, data)
    if isinstance(data, Mapping):
        return {
            k: expand_variables(v, path, environ, f"{key}.{k}" if key else str(k))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [expand_variables(v, path, environ, f"{key}[{i}]") for i, v in enumerate(data)]
    return data


_TOP_KEYS = ("store", "cache", "routes")
_STORE_KEYS = ("url", "namespace", "cluster")
_CACHE_KEYS = ("max_entries", "soft_session", "hard_session")
_ROUTE_KEYS = (
    "when",
    "update",
    "id",
    "collection",
    "database",
    "spec",
    "doc",
    "soft_session",
    "hard_session",
    "idle",
    "max_age",
    "fields",
    "max_events",
    "ends_when",
)
_SESSION_ALIASES = (("idle", "soft_session"), ("max_age", "hard_session"))
"""Per-route session keys: the issue's names and the older ones, which still work."""
_URL_SCHEMES = ("redis", "rediss", "unix")


def _kind(value: Any) -> str:
    """A value's type in the words of the config file, not Python's."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, Mapping):
        return "table"
    return type(value).__name__


class _Validator:
    """Walks a parsed document, carrying the file name so every error can say it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str | None, message: str) -> NoReturn:
        raise ConfigError(message, path=self.path, key=key)

    def table(self, value: Any, key: str | None, known: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.fail(key, f"expected a table, got {_kind(value)}")
        for name in value:
            if name not in known:
                where = f"{key}.{name}" if key else str(name)
                self.fail(where, f"unknown key {name!r} (known: {', '.join(sorted(known))})")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {_kind(value)}")
        if not value:
            self.fail(key, "must not be empty")
        return value

    def duration(self, value: Any, key: str) -> float:
        try:
            return parse_duration(value)
        except ValueError as e:
            self.fail(key, str(e))

    def template(self, value: Any, key: str) -> Template:
        try:
            return Template(value)
        except ValueError as e:
            self.fail(key, str(e))

    def config(self, data: Any) -> Config:
        top = self.table({} if data is None else data, None, _TOP_KEYS)
        return Config(
            path=self.path,
            store=self.store(top.get("store", {})),
            cache=self.cache(top.get("cache", {})),
            routes=self.routes(top.get("routes")),
        )

    def store(self, value: Any) -> StoreConfig:
        store = self.table(value, "store", _STORE_KEYS)
        url = namespace = None
        if "url" in store:
            url = self.string(store["url"], "store.url")
            scheme = url.partition("://")[0] if "://" in url else ""
            if scheme not in _URL_SCHEMES:
                # The URL itself is not repeated: it may hold a password.
                self.fail("store.url", "expected a redis://, rediss:// or unix:// URL")
        if "namespace" in store:
            namespace = self.string(store["namespace"], "store.namespace")
            try:
                Keys(namespace)
            except ValueError as e:
                self.fail("store.namespace", f"{e} (no spaces, braces or glob characters)")
        cluster = None
        if "cluster" in store:
            cluster = store["cluster"]
            if not isinstance(cluster, bool):
                self.fail("store.cluster", f"expected true or false, not {cluster!r}")
            if cluster and url and not url.startswith(("redis://", "rediss://")):
                self.fail("store.cluster", "a cluster is reached by a redis:// or rediss:// URL")
        return StoreConfig(url=url, namespace=namespace, cluster=cluster)

    def cache(self, value: Any) -> CacheConfig:
        cache = self.table(value, "cache", _CACHE_KEYS)
        max_entries = cache.get("max_entries", defaults.MAX_ENTRIES)
        if isinstance(max_entries, bool) or not isinstance(max_entries, int):
            self.fail("cache.max_entries", f"expected an integer, got {_kind(max_entries)}")
        if max_entries < 1:
            self.fail("cache.max_entries", f"must be at least 1, got {max_entries}")
        soft = defaults.SOFT_SESSION_S
        hard = defaults.HARD_SESSION_S
        if "soft_session" in cache:
            soft = self.duration(cache["soft_session"], "cache.soft_session")
        if "hard_session" in cache:
            hard = self.duration(cache["hard_session"], "cache.hard_session")
        return CacheConfig(max_entries=max_entries, soft_session_s=soft, hard_session_s=hard)

    def routes(self, value: Any) -> tuple[Route, ...]:
        if value is None:
            self.fail("routes", "missing: at least one [[routes]] entry is required")
        if not isinstance(value, list):
            self.fail("routes", f"expected a list of tables, got {_kind(value)}")
        if not value:
            self.fail("routes", "at least one route is required")
        return tuple(self.route(item, f"routes[{i}]") for i, item in enumerate(value))

    def route(self, value: Any, key: str) -> Route:
        route = self.table(value, key, _ROUTE_KEYS)
        for required in ("update", "id"):
            if required not in route:
                self.fail(f"{key}.{required}", f"missing required key {required!r}")
        update_path = self.string(route["update"], f"{key}.update")
        try:
            update = resolve_update(update_path)
        except ValueError as e:
            self.fail(f"{key}.update", str(e))
        if not isinstance(route["id"], str):
            self.fail(f"{key}.id", f"expected a string, got {_kind(route['id'])}")
        optional: dict[str, Any] = {}
        for name in ("collection", "database"):
            if name in route:
                optional[name] = self.string(route[name], f"{key}.{name}")
        optional.update(self.sessions(route, key))
        optional.update(self.triggers(route, key))
        optional.update(self.fields(route, key, update, update_path))
        built = Route(
            update=update,
            update_path=update_path,
            id=self.template(route["id"], f"{key}.id"),
            when=self.when(route.get("when", {}), f"{key}.when"),
            spec=self.spec(route.get("spec", {}), f"{key}.spec"),
            doc=self.doc(route.get("doc", {}), f"{key}.doc"),
            **optional,
        )
        # The sink's own checks (a SQL table needs a spec, distinct column names):
        # better at load than at the first write, half an hour into the run.
        try:
            update.check_route(built)
        except ConfigError as e:
            self.fail(f"{key}.{e.key}" if e.key else key, e.reason)
        return built

    def sessions(self, route: Mapping[str, Any], key: str) -> dict[str, float]:
        """A route's own session lengths, under their names or their older aliases."""
        out: dict[str, float] = {}
        for name, old in _SESSION_ALIASES:
            if name in route and old in route:
                self.fail(f"{key}.{name}", f"{name!r} and {old!r} are the same setting: give one")
            for given in (name, old):
                if given in route:
                    out[f"{old}_s"] = self.duration(route[given], f"{key}.{given}")
        return out

    def fields(
        self, route: Mapping[str, Any], key: str, update: type[Update], update_path: str
    ) -> dict[str, Any]:
        """Declared ``fields``, which only a ``FieldsUpdate`` class can merge (and needs)."""
        if "fields" not in route:
            if issubclass(update, FieldsUpdate):
                self.fail(f"{key}.fields", f"missing: {update_path!r} aggregates declared fields")
            return {}
        if "doc" in route:
            self.fail(f"{key}.fields", "give 'doc' (sums) or 'fields' (strategies), not both")
        if not issubclass(update, FieldsUpdate):
            self.fail(
                f"{key}.update",
                f"{update_path!r} cannot merge fields: it must subclass "
                "phonon_cli.fields.FieldsUpdate (e.g. phonon_cli.sinks.sql:Aggregate)",
            )
        return {"fields": parse_fields(self, route["fields"], f"{key}.fields")}

    def triggers(self, route: Mapping[str, Any], key: str) -> dict[str, Any]:
        """``max_events`` and ``ends_when``: what ends a key's session at once."""
        out: dict[str, Any] = {}
        if "max_events" in route:
            n = route["max_events"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                self.fail(f"{key}.max_events", f"expected a positive integer, got {n!r}")
            out["max_events"] = n
        if "ends_when" in route:
            when = self.when(route["ends_when"], f"{key}.ends_when")
            if not when:
                self.fail(f"{key}.ends_when", "empty: it would end every session at each event")
            out["ends_when"] = matcher(when)
        return out

    def when(self, value: Any, key: str) -> dict[str, tuple[Scalar, ...]]:
        """Field path -> allowed values. A nested table is a nested field, so TOML's
        ``when = { payload.kind = "x" }`` means the field ``payload.kind``."""
        if not isinstance(value, Mapping):
            self.fail(key, f"expected a table, got {_kind(value)}")
        out: dict[str, tuple[Scalar, ...]] = {}

        def walk(table: Mapping[str, Any], prefix: str) -> None:
            for name, wanted in table.items():
                name = str(name)
                if not name or any(not part for part in name.split(".")):
                    self.fail(f"{key}.{prefix}{name}", "empty field name")
                if isinstance(wanted, Mapping):
                    walk(wanted, f"{prefix}{name}.")
                    continue
                values = wanted if isinstance(wanted, list) else [wanted]
                if not values:
                    self.fail(f"{key}.{prefix}{name}", "an empty list matches nothing")
                for v in values:
                    if v is not None and not isinstance(v, (str, int, float)):
                        self.fail(
                            f"{key}.{prefix}{name}",
                            f"expected a string, number, boolean or a list of them, got {_kind(v)}",
                        )
                out[prefix + name] = tuple(values)

        walk(value, "")
        return out

    def spec(self, value: Any, key: str) -> dict[str, Template]:
        table = self.mapping(value, key)
        out: dict[str, Template] = {}
        for name, source in table.items():
            where = f"{key}.{name}"
            if not isinstance(source, (str, int, float)):  # bool is an int
                self.fail(where, f"expected a template or a constant, got {_kind(source)}")
            out[str(name)] = self.template(source, where)
        return out

    def doc(self, value: Any, key: str) -> dict[Template, Template]:
        table = self.mapping(value, key)
        out: dict[Template, Template] = {}
        for name, source in table.items():
            where = f"{key}.{name}"
            name_template = self.template(str(name), where)
            if isinstance(source, bool) or not isinstance(source, (str, int, float)):
                self.fail(where, f"expected a number or '{{field}}', got {_kind(source)}")
            value_template = self.template(source, where)
            if not isinstance(source, str) and bad_number(source):
                self.fail(where, f"{source!r} is outside the 64-bit range a sum can hold")
            if isinstance(source, str) and not value_template.is_whole_field:
                # Anything but exactly "{field}" renders text, never a number.
                self.fail(where, f"template {source!r} cannot yield a number (use '{{field}}')")
            out[name_template] = value_template
        return out

    def mapping(self, value: Any, key: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.fail(key, f"expected a table, got {_kind(value)}")
        return value


# -- files ----------------------------------------------------------------------------

_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column \d+\)$")


def _parse_toml(text: str, path: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        position = _TOML_POSITION.search(message)
        if position is None:
            raise ConfigError(f"invalid TOML: {message}", path=path) from e
        reason = message[: position.start()]
        raise ConfigError(f"invalid TOML at line {position.group(1)}: {reason}", path=path) from e


def _parse_yaml(text: str, path: str) -> Any:
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - PyYAML is a dependency today
        raise ConfigError("YAML configs need PyYAML: pip install PyYAML", path=path) from e

    class UniqueKeyLoader(yaml.SafeLoader):
        """safe_load, except that a key given twice is an error: PyYAML would keep
        the last one silently, and a route or setting would vanish unnoticed."""

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if not isinstance(key, Hashable):
                continue  # PyYAML itself rejects unhashable keys, with a better message
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"invalid YAML at line {line}: duplicate key {key!r}", path=path)
            seen.add(key)
        return loader.construct_mapping(node)

    UniqueKeyLoader.add_constructor(
        yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping
    )
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        reason = ": ".join(p for p in (e.context, e.problem) if p) or "syntax error"
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"invalid YAML{where}: {reason}", path=path) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", path=path) from e


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    ".toml": _parse_toml,
    ".yaml": _parse_yaml,
    ".yml": _parse_yaml,
}


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a config file; the format follows the extension.

    Args:
        path: a ``.toml``, ``.yaml`` or ``.yml`` file.

    Returns:
        The validated config.

    Raises:
        ConfigError: the file is missing, unreadable, malformed or invalid; the
            message names the file, the key and what is wrong.
    """
    name = os.fspath(path)
    parse = _PARSERS.get(Path(name).suffix.lower())
    if parse is None:
        raise ConfigError("unknown config format (use a .toml, .yaml or .yml file)", path=name)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError("no such file", path=name) from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text: {e.reason} at byte {e.start}", path=name) from e
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", path=name) from e
    return Config.from_mapping(parse(text, name), name)
