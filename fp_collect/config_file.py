"""The collector's configuration from a TOML file (the dev server's ``--config``).

Every key mirrors a keyword of :class:`~fp_collect.config.CollectorConfig`, and each
``[[workspaces.sources]]`` table one of :class:`~fp_collect.config.Source`::

    storage = "sqlite:///events.db"
    prefix = "/collect"
    trusted_proxies = ["10.0.0.0/8"]
    read_tokens = ["a-secret-of-16-characters-or-more"]

    [limits]
    max_batch_bytes = 512000

    [[workspaces]]
    id = "rosebud"
    name = "Rosebud Motels"

    [[workspaces.sources]]
    id = "www"
    write_key = "www-write-key"
    allowed_origins = ["https://www.rosebudmotels.com"]
    session_timeout = 1800          # seconds, or false for no sessions
    strict_event_names = false
    partial_success_status = 207    # or 200 for rudder-sdk-python
    restrictions = { bots = "flag", email_open_window = 600, confirmation_dedup = true }
    rules = [
      { type = "rename_event", from = "signup", to = "Signed Up" },
      { type = "drop_property", name = "password" },
      { type = "hash_property", name = "email", salt = "pepper" },
      { type = "copy_context_field", path = "page.url", to = "url" },
    ]

Top-level ``[[sources]]`` tables are accepted too (workspace ``"default"``). Unknown
keys are errors, so a typo never silently turns a setting off.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from fp_collect.config import CollectorConfig, Limits, Source, Workspace
from fp_collect.errors import ConfigError
from fp_collect.restrictions import Restrictions
from fp_collect.rules import CopyContextField, DropProperty, HashProperty, RenameEvent, Rule

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

_RULES: dict[str, tuple[Callable[..., Rule], dict[str, str]]] = {
    # rule type -> (class, {file key: keyword})
    "rename_event": (RenameEvent, {"from": "from_name", "to": "to_name"}),
    "drop_property": (DropProperty, {"name": "name"}),
    "hash_property": (HashProperty, {"name": "name", "salt": "salt"}),
    "copy_context_field": (CopyContextField, {"path": "path", "to": "to_property"}),
}
_SOURCE_KEYS = frozenset(
    {"write_key", "id", "name", "enabled", "allowed_origins", "session_timeout",
     "strict_event_names", "rules", "restrictions", "partial_success_status"}
)  # fmt: skip
_TOP_KEYS = frozenset(
    {"storage", "prefix", "trusted_proxies", "read_tokens", "max_future_seconds",
     "record_unauthenticated", "commit_timeout", "limits", "sources", "workspaces"}
)  # fmt: skip


def load_config(path: str | os.PathLike[str], **overrides: object) -> CollectorConfig:
    """Read ``path`` into a validated :class:`CollectorConfig`; keyword overrides win."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {os.fspath(path)!r}: {exc}") from exc
    except ValueError as exc:
        # TOMLDecodeError and UnicodeDecodeError, and the int() of an integer of more
        # than 4,300 digits, which Python refuses to convert.
        raise ConfigError(f"{os.fspath(path)!r} is not valid TOML: {exc}") from exc
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        raise ConfigError(f"{os.fspath(path)!r} nests arrays or tables too deeply") from None
    try:
        return config_from_mapping(data, **overrides)
    except ConfigError as exc:
        raise ConfigError(f"{os.fspath(path)}: {exc}") from exc


def config_from_mapping(data: Mapping[str, Any], **overrides: object) -> CollectorConfig:
    _known(data, _TOP_KEYS, "the top level")
    values: dict[str, Any] = {k: v for k, v in data.items() if k not in _STRUCTURED}
    for key in ("trusted_proxies", "read_tokens"):
        if key in values:
            values[key] = tuple(_list(values[key], key))
    if "limits" in data:
        limits = _table(data["limits"], "limits")
        _known(limits, _LIMIT_KEYS, "limits")
        try:
            values["limits"] = Limits(**limits)
        except ConfigError as exc:
            raise ConfigError(f"limits: {exc}") from exc
    values["sources"] = tuple(
        _source(table, f"sources[{i}]") for i, table in enumerate(_list(data.get("sources", []),
                                                                         "sources"))
    )  # fmt: skip
    values["workspaces"] = tuple(
        _workspace(table, i) for i, table in enumerate(_list(data.get("workspaces", []),
                                                             "workspaces"))
    )  # fmt: skip
    values.update(overrides)
    try:
        return CollectorConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


_STRUCTURED = frozenset({"limits", "sources", "workspaces"})
_LIMIT_KEYS = frozenset(f.name for f in dataclasses.fields(Limits))


def _workspace(table: object, index: int) -> Workspace:
    where = f"workspaces[{index}]"
    data = _table(table, where)
    _known(data, {"id", "name", "sources"}, where)
    sources = tuple(
        _source(source, f"{where}.sources[{i}]")
        for i, source in enumerate(_list(data.get("sources", []), f"{where}.sources"))
    )
    try:
        return Workspace(id=data.get("id", ""), name=data.get("name", ""), sources=sources)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _source(table: object, where: str) -> Source:
    data = dict(_table(table, where))
    _known(data, _SOURCE_KEYS, where)
    if "allowed_origins" in data:
        data["allowed_origins"] = tuple(_list(data["allowed_origins"], f"{where}.allowed_origins"))
    if data.get("session_timeout") is False:
        data["session_timeout"] = None
    if "rules" in data:
        data["rules"] = [
            _rule(rule, f"{where}.rules[{i}]")
            for i, rule in enumerate(_list(data["rules"], f"{where}.rules"))
        ]
    if "restrictions" in data:
        data["restrictions"] = _restrictions(data["restrictions"], f"{where}.restrictions")
    if "write_key" not in data:
        raise ConfigError(f"{where}: write_key is required")
    try:
        return Source(**data)
    except ConfigError as exc:  # say which source, as the other errors here do
        raise ConfigError(f"{where}: {exc}") from exc


_RESTRICTION_KEYS = frozenset(
    {"bots", "confirmation_dedup", "email_open_window", "confirmation_events",
     "email_open_events"}
)  # fmt: skip


def _restrictions(table: object, where: str) -> Restrictions:
    data = dict(_table(table, where))
    _known(data, _RESTRICTION_KEYS, where)
    if data.get("email_open_window") is False:
        data["email_open_window"] = None
    for key in ("confirmation_events", "email_open_events"):
        if key in data:
            data[key] = tuple(_list(data[key], f"{where}.{key}"))
    try:
        return Restrictions(**data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _rule(table: object, where: str) -> Rule:
    data = dict(_table(table, where))
    kind = data.pop("type", None)
    # A string first: an array or a table is unhashable, and "in" would raise TypeError.
    if not isinstance(kind, str) or kind not in _RULES:
        raise ConfigError(f"{where}: type must be one of {', '.join(sorted(_RULES))}")
    make, keywords = _RULES[kind]
    _known(data, set(keywords), where)
    try:
        return make(**{keywords[key]: value for key, value in data.items()})
    except TypeError as exc:  # a required key is missing
        needed = ", ".join(sorted(keywords))
        raise ConfigError(f"{where}: a {kind} rule takes {needed}") from exc
    except ConfigError as exc:  # a value of the wrong type
        raise ConfigError(f"{where}: {exc}") from exc


def _table(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a table")
    return value


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be an array")
    return value


def _known(data: Mapping[str, Any], allowed: frozenset[str] | set[str], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
