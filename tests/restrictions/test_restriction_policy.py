"""The restriction policy on its own: pure functions of the event and its time."""

from __future__ import annotations

from pathlib import Path

import pytest

from fp_collect import CollectorConfig, Restrictions
from fp_collect.errors import ConfigError
from fp_collect.restrictions import (
    DUPLICATE_ORDER,
    EMAIL_OPEN_THROTTLED,
    crawler_pattern,
    is_browser_traffic,
    user_key,
)
from fp_collect.store.base import Claim, Identity

from .conftest import BROWSER_UA, GOOGLEBOT

USER = Identity("user_id", "u-1")
ANON = Identity("anonymous_id", "a-1")
EMAIL = Identity("email", "ann@example.com")


def test_a_confirmation_claims_its_order_id_forever() -> None:
    claims, warnings = Restrictions().claims("Order Completed", {"order_id": "o-1"}, 10.0)
    assert claims == (Claim(DUPLICATE_ORDER, "o-1", 10.0, None),)
    assert warnings == ()


@pytest.mark.parametrize("properties", [{"orderId": 7}, {"order_id": "7"}, {"orderId": "7"}])
def test_order_ids_are_one_key_whatever_their_spelling(properties: dict[str, object]) -> None:
    (claim,), _ = Restrictions().claims("Order Completed", properties, 1.0)
    assert claim.key == "7"


@pytest.mark.parametrize("properties", [{}, {"order_id": ""}, {"order_id": True}, {"x": 1}, None])
def test_a_confirmation_without_an_order_id_is_stored_unclaimed_with_a_warning(
    properties: dict[str, object] | None,
) -> None:
    claims, warnings = Restrictions().claims("Order Completed", properties, 1.0)
    assert claims == ()
    assert warnings == ("confirmation without an order id: not deduplicated",)


def test_an_email_open_claims_its_user_and_campaign_for_the_window() -> None:
    restrictions = Restrictions(email_open_window=60)
    (claim,), _ = restrictions.claims("Email Opened", {"campaign_id": "c"}, 100.0, (USER,))
    assert (claim.kind, claim.at, claim.until) == (EMAIL_OPEN_THROTTLED, 100.0, 160.0)
    (other,), _ = restrictions.claims("Email Opened", {"email_id": "e"}, 100.0, (USER,))
    (plain,), _ = restrictions.claims("Email Opened", {}, 100.0, (USER,))
    assert len({claim.key, other.key, plain.key}) == 3


def test_long_ids_are_hashed_into_a_bounded_key() -> None:
    (claim,), _ = Restrictions().claims("Order Completed", {"order_id": "x" * 10_000}, 1.0)
    assert claim.key.startswith("sha256:") and len(claim.key) < 100
    (again,), _ = Restrictions().claims("Order Completed", {"order_id": "x" * 10_000}, 2.0)
    assert again.key == claim.key


def test_other_events_and_switched_off_restrictions_claim_nothing() -> None:
    assert Restrictions().claims("Page Viewed", {"order_id": "1"}, 1.0, (USER,)) == ((), ())
    assert Restrictions().claims(None, {"order_id": "1"}, 1.0, (USER,)) == ((), ())
    off = Restrictions(confirmation_dedup=False, email_open_window=None)
    assert off.claims("Order Completed", {"order_id": "1"}, 1.0) == ((), ())
    assert off.claims("Email Opened", {}, 1.0, (USER,)) == ((), ())


def test_event_names_that_count_are_configurable() -> None:
    restrictions = Restrictions(
        confirmation_events=("Purchase",),
        # One name alone is accepted too (made a tuple).
        email_open_events="Opened",
    )
    assert restrictions.kind_of("Purchase") == "confirmation"
    assert restrictions.kind_of("Opened") == "email_open"
    assert restrictions.kind_of("Order Completed") is None


def test_the_user_key_prefers_the_most_lasting_identifier() -> None:
    assert user_key((ANON, EMAIL, USER)) == "user_id:u-1"
    assert user_key((ANON, EMAIL)) == "email:ann@example.com"
    assert user_key((ANON,), "PR1") == "profile:PR1"
    assert user_key((ANON,)) == "anonymous_id:a-1"
    assert user_key(()) is None


@pytest.mark.parametrize(
    ("origin", "referer", "agent", "browser"),
    [
        ("https://shop.example", None, "curl/8.5.0", True),
        (None, "https://shop.example/cart", None, True),
        (None, None, BROWSER_UA, True),
        (None, None, GOOGLEBOT, True),
        (None, None, "analytics-python/2.3.3", False),
        (None, None, "okhttp/4.12.0", False),
        (None, None, None, False),
    ],
)
def test_browser_traffic(origin: str, referer: str, agent: str, browser: bool) -> None:
    assert is_browser_traffic(origin, referer, agent) is browser


@pytest.mark.parametrize(
    "agent",
    [
        GOOGLEBOT,
        "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "HeadlessChrome/124.0.0.0 Safari/537.36",
    ],
)
def test_crawlers_are_recognised_by_the_maintained_list(agent: str) -> None:
    assert crawler_pattern(agent) is not None


@pytest.mark.parametrize(
    "agent",
    [
        BROWSER_UA,
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
        "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    ],
)
def test_people_browsers_are_not_crawlers(agent: str) -> None:
    assert crawler_pattern(agent) is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"bots": "block"}, "bots must be one of"),
        ({"email_open_window": 0}, "email_open_window"),
        ({"email_open_window": True}, "email_open_window"),
        ({"confirmation_dedup": "yes"}, "confirmation_dedup"),
        ({"confirmation_events": ("",)}, "confirmation_events"),
    ],
)
def test_bad_settings_are_refused_eagerly(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Restrictions(**settings)  # type: ignore[arg-type]


def test_restrictions_load_from_a_configuration_file(tmp_path: Path) -> None:
    path = tmp_path / "fp.toml"
    path.write_text(
        """
        storage = "memory://"
        [[sources]]
        write_key = "k"
        [sources.restrictions]
        bots = "flag"
        email_open_window = 600
        confirmation_dedup = false
        email_open_events = ["Email Opened", "Newsletter Opened"]
        [[sources]]
        write_key = "k2"
        restrictions = { email_open_window = false }
        """
    )
    first, second = CollectorConfig.from_file(path).sources
    assert first.restrictions == Restrictions(
        bots="flag",
        email_open_window=600,
        confirmation_dedup=False,
        email_open_events=("Email Opened", "Newsletter Opened"),
    )
    assert second.restrictions.email_open_window is None
    path.write_text('[[sources]]\nwrite_key = "k"\nrestrictions = { bot = "flag" }\n')
    with pytest.raises(ConfigError, match=r"sources\[0\].restrictions: unknown key\(s\) bot"):
        CollectorConfig.from_file(path)
