"""The bot restriction through every dialect: browser traffic from crawlers is dropped
(or flagged, or allowed, as the source says); server-side traffic never is."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import pytest

from fp_collect import Collector, Request, Restrictions, Source
from fp_collect.store import Query

from .conftest import BROWSER_UA, GOOGLEBOT, KEY, answer, sender

BROWSER = {"user-agent": BROWSER_UA, "origin": "https://shop.example"}
CRAWLER = {"user-agent": GOOGLEBOT, "origin": "https://shop.example"}
TRACK = {"writeKey": KEY, "userId": "u-1", "event": "Product Viewed"}

MakeCollector = Callable[..., Collector]


def bot_source(policy: str) -> Source:
    return Source(write_key=KEY, id="site", restrictions=Restrictions(bots=policy))


def stored_names(collector: Collector) -> list[str | None]:
    return [event.name for event in collector.store.events()]


def rejection_reasons(collector: Collector) -> list[str]:
    return [rejection.reason for rejection in collector.store.rejections()]


def test_a_crawler_in_a_browser_is_dropped_and_answered_like_a_success(
    make_collector: MakeCollector,
) -> None:
    collector = make_collector()
    send = sender(collector)
    response = send("/v1/track", {**TRACK, "messageId": "m-bot"}, CRAWLER)
    assert (response.status, answer(response)) == (200, {"success": True})
    assert stored_names(collector) == []
    [rejection] = collector.store.rejections()
    assert rejection.reason == "bot"
    assert "Googlebot" in rejection.message
    assert json.loads(rejection.payload)["messageId"] == "m-bot"
    assert send("/v1/track", TRACK, BROWSER).status == 200
    assert stored_names(collector) == ["Product Viewed"]


def test_a_server_sdk_relaying_a_crawlers_user_agent_is_not_judged(
    make_collector: MakeCollector,
) -> None:
    collector = make_collector()
    relayed = {**TRACK, "context": {"userAgent": GOOGLEBOT, "ip": "66.249.66.1"}}
    response = sender(collector)("/v1/track", relayed, {"user-agent": "analytics-python/2.3.3"})
    assert response.status == 200
    [event] = collector.store.events()
    assert json.loads(event.payload)["context"]["userAgent"] == GOOGLEBOT
    assert event.warnings == ()


def test_app_http_clients_on_the_list_are_not_browser_traffic(
    make_collector: MakeCollector,
) -> None:
    # okhttp (Android apps) and python-requests are on the crawler list, but without a
    # browser's marks they are apps and servers, not crawlers in a page.
    collector = make_collector()
    send = sender(collector)
    for agent in ("okhttp/4.12.0", "python-requests/2.32.3"):
        assert send("/v1/track", TRACK, {"user-agent": agent}).status == 200
    assert len(stored_names(collector)) == 2


def test_the_flag_policy_stores_with_a_marker_found_by_flagged_queries(
    make_collector: MakeCollector,
) -> None:
    collector = make_collector(bot_source("flag"))
    send = sender(collector)
    send("/v1/track", {**TRACK, "messageId": "crawled"}, CRAWLER)
    send("/v1/track", {**TRACK, "messageId": "viewed"}, BROWSER)
    assert len(stored_names(collector)) == 2
    [flagged] = collector.store.events(Query(flagged=True))
    assert flagged.message_id == "crawled"
    assert any(w.startswith("bot: ") and "Googlebot" in w for w in flagged.warnings)
    # The list's pattern as written (Googlebot\/), not its repr with doubled backslashes.
    assert not any("\\\\" in w for w in flagged.warnings), flagged.warnings
    assert rejection_reasons(collector) == []


def test_the_allow_policy_turns_the_check_off(make_collector: MakeCollector) -> None:
    collector = make_collector(bot_source("allow"))
    sender(collector)("/v1/track", TRACK, CRAWLER)
    [event] = collector.store.events()
    assert event.warnings == ()


def test_a_crawlers_batch_is_dropped_item_by_item_without_errors(
    make_collector: MakeCollector,
) -> None:
    collector = make_collector()
    batch = {
        "writeKey": KEY,
        "batch": [
            {"type": "track", "userId": "u", "event": "Product Viewed"},
            {"type": "track", "event": "No User"},  # invalid: reported as such
        ],
    }
    response = sender(collector)("/v1/batch", batch, CRAWLER)
    body = answer(response)
    assert response.status == 400  # the only stored-or-not answer: the invalid item
    assert [error["index"] for error in body["Errors"]] == [1]
    assert sorted(rejection_reasons(collector)) == ["bot", "missing_user_id"]


def test_bots_are_dropped_from_firstparty_and_user_event_traffic(
    make_collector: MakeCollector,
) -> None:
    collector = make_collector()
    send = sender(collector)
    first = send("/events/track", {"write_key": KEY, "event": "Page Viewed"}, CRAWLER)
    assert answer(first) == {"success": True, "discarded": "bot"}
    bulk = send("/events/track/bulk", [{"write_key": KEY, "event": "Page Viewed"}], CRAWLER)
    assert answer(bulk)["events"] == [{"index": 0, "success": True, "discarded": "bot"}]
    # The user-event API needs a known user: identify them from the server first.
    send("/v1/identify", {"writeKey": KEY, "userId": "u-9"}, {"user-agent": "analytics-node"})
    user_event = {"writeKey": KEY, "user": {"_id": "u-9"}, "event": {"update": {"plan": "pro"}}}
    response = send("/v1/event", user_event, CRAWLER)
    assert response.status == 200
    assert answer(response)["results"]["discarded"] == "bot"
    assert rejection_reasons(collector) == ["bot", "bot", "bot"]
    assert [event.type for event in collector.store.events()] == ["identify"]


def test_a_crawler_loading_the_pixel_is_recorded_not_stored(
    make_collector: MakeCollector,
) -> None:
    collector = make_collector()
    data = base64.b64encode(json.dumps({**TRACK, "event": "Email Opened"}).encode()).decode()
    route = collector.route("/v1/pixel/track")
    assert route is not None
    request = Request("GET", "/v1/pixel/track", f"data={data}", CRAWLER, b"", "10.0.0.1")
    response = collector.handle(route, request)
    assert (response.status, response.body[:3]) == (200, b"GIF")
    assert stored_names(collector) == []
    assert rejection_reasons(collector) == ["bot"]


@pytest.mark.parametrize("policy", ["drop", "flag", "allow"])
def test_people_are_never_dropped_whatever_the_policy(
    make_collector: MakeCollector, policy: str
) -> None:
    collector = make_collector(bot_source(policy))
    assert sender(collector)("/v1/track", TRACK, BROWSER).status == 200
    [event] = collector.store.events()
    assert event.warnings == ()
