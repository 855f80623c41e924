"""The configuration objects take the collections a user naturally writes."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from fp_collect import CollectorConfig, Source, Workspace
from fp_collect.errors import ConfigError
from fp_collect.restrictions import Restrictions
from fp_collect.rules import DropProperty, RuleSet

TOKEN = "a-read-token-of-16+-characters"


def test_lists_and_single_strings_are_taken_and_kept_as_tuples() -> None:
    """As the README writes them. This module is type-checked under mypy --strict with
    the rest of the tests, so it also proves the annotations accept these values."""
    config = CollectorConfig(
        sources=[
            Source(
                write_key="site-key",
                id="site",
                allowed_origins=["https://shop.example", "https://www.shop.example"],
                rules=[DropProperty("password")],
                restrictions=Restrictions(confirmation_events=["Purchase", "Order Completed"]),
            )
        ],
        workspaces=[Workspace("mobile", sources=[Source(write_key="app-key", id="app")])],
        trusted_proxies="10.0.0.0/8",
        read_tokens=[TOKEN],
    )
    site, app = config.sources
    assert isinstance(config.sources, tuple) and isinstance(config.workspaces, tuple)
    assert (site.id, app.id, app.workspace) == ("site", "app", "mobile")
    assert site.allowed_origins == ("https://shop.example", "https://www.shop.example")
    assert isinstance(site.rules, RuleSet) and len(site.rules.rules) == 1
    assert site.restrictions.confirmation_events == ("Purchase", "Order Completed")
    # One string is one entry, not a tuple of its letters.
    assert config.trusted_proxies == ("10.0.0.0/8",)
    assert config.read_tokens == (TOKEN,)
    assert Source(write_key="k", allowed_origins="https://a.example").allowed_origins == (
        "https://a.example",
    )


def test_a_config_with_workspaces_can_be_copied_with_a_change() -> None:
    config = CollectorConfig(
        sources=[Source(write_key="site-key", id="site")],
        workspaces=[Workspace("mobile", sources=[Source(write_key="app-key", id="app")])],
    )
    copy = dataclasses.replace(config, prefix="/collect")
    assert copy.prefix == "/collect" and copy.sources == config.sources
    with pytest.raises(ConfigError, match="share the write key"):
        dataclasses.replace(config, sources=(*config.sources, Source(write_key="app-key")))


def test_a_collection_holding_something_else_is_refused_without_showing_it() -> None:
    with pytest.raises(
        ConfigError, match=r"read_tokens\[1\] must be a string, not bytes"
    ) as raised:
        CollectorConfig(read_tokens=[TOKEN, b"another-secret-token!"])  # type: ignore[list-item]
    assert TOKEN not in str(raised.value) and "another-secret" not in str(raised.value)
    with pytest.raises(ConfigError, match=r"allowed_origins\[1\] must be a string, not NoneType"):
        Source(write_key="k", allowed_origins=["https://a.example", None])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="sources must be Source objects"):
        CollectorConfig(sources=["site-key"])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        # Deliberately wrong types: what an untyped caller or a hand-built dict may pass.
        (lambda: Source(write_key="k", allowed_origins=None), "allowed_origins must be a"),  # type: ignore[arg-type]
        (lambda: Source(write_key="k", rules=None), "rules must be a list"),  # type: ignore[arg-type]
        (lambda: CollectorConfig(sources=Source(write_key="k")), "sources must be a"),  # type: ignore[arg-type]
        (lambda: CollectorConfig(workspaces=None), "workspaces must be a list"),  # type: ignore[arg-type]
        (lambda: CollectorConfig(trusted_proxies=None), "trusted_proxies must be a"),  # type: ignore[arg-type]
        (lambda: CollectorConfig(read_tokens=None), "read_tokens must be a list"),  # type: ignore[arg-type]
        (lambda: Workspace("w", sources=None), "'w': sources must be a list"),  # type: ignore[arg-type]
        (lambda: Restrictions(email_open_events=None), "email_open_events must be a"),  # type: ignore[arg-type]
    ],
)
def test_something_that_is_no_collection_is_a_config_error(
    make: Callable[[], object], message: str
) -> None:
    """A clear ConfigError at start-up, not a TypeError from deep inside."""
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("cls", [Source, Workspace, CollectorConfig, Restrictions])
def test_the_constructor_type_checkers_see_is_the_one_that_runs(cls: type[Any]) -> None:
    """Each class declares, for type checkers only, a constructor with wider parameter
    types than its fields. It must name the same parameters, in the same order, with
    the same defaults as the one the dataclass generates: a field added without it
    would be unknown to typed callers."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    (typed,) = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name == "__init__"
    ]
    names = [arg.arg for arg in typed.args.args[1:]]
    fields = [f for f in dataclasses.fields(cls) if f.init]
    assert names == [f.name for f in fields]
    namespace = vars(sys.modules[cls.__module__])
    with_defaults = names[len(names) - len(typed.args.defaults) :]
    defaults = dict(zip(with_defaults, typed.args.defaults, strict=True))
    for f in fields:
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            assert f.name not in defaults, f.name
            continue
        factory: Any = f.default_factory
        expected = f.default if f.default is not dataclasses.MISSING else factory()
        given = eval(compile(ast.Expression(defaults[f.name]), "<default>", "eval"), namespace)
        assert given == expected, f.name
