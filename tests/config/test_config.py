"""The configuration objects take the collections a user naturally writes."""

from __future__ import annotations

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
    assert isinstance(site.rules, RuleSet) and site.rule_set is site.rules
    assert site.restrictions.confirmation_events == ("Purchase", "Order Completed")
    # One string is one entry, not a tuple of its letters.
    assert config.trusted_proxies == ("10.0.0.0/8",)
    assert config.read_tokens == (TOKEN,)
    assert Source(write_key="k", allowed_origins="https://a.example").allowed_origins == (
        "https://a.example",
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"trusted_proxies": ["10.0.0.1", 10]}, "trusted_proxies must be strings"),
        ({"read_tokens": [TOKEN, b"bytes-are-not-text!"]}, "read_tokens must be strings"),
        ({"sources": ["site-key"]}, "sources must be Source objects"),
    ],
)
def test_a_collection_holding_something_else_is_refused(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        CollectorConfig(**options)  # type: ignore[arg-type]


def test_an_allowed_origin_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(ConfigError, match="allowed_origins must be strings"):
        Source(write_key="k", allowed_origins=["https://a.example", None])  # type: ignore[list-item]
