"""Restrictions through the user-event API (seed 003), and idempotent retries.

* A second confirmation of one ``orderId`` (7 and "7" alike; also one sent as a Segment
  ``Order Completed``) in the same source is discarded.
* An ``email_open`` within the window (20 minutes) of the previous one for the same user,
  email and campaign is discarded.

A discarded event is answered 200 like an accepted one (``"discarded": reason``) and
recorded as a rejection with that reason. Time is driven with ``Collector(clock=...)``.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from fp_collect import Restrictions, Source

KEY = "ue-key"
OTHER_KEY = "other-key"
CREATED = "Event was created for the specified user"
ANN = {"email": "ann@example.com"}
BOB = {"email": "bob@example.com"}
WINDOW = 20 * 60


def created(identifier: str = "email", **extra: object) -> dict[str, object]:
    return {"results": {"message": "Event created", identifier: CREATED, **extra}}


def known(harness: Any) -> str:
    """Ann (u-ann, ann@example.com) and Bob (u-bob, bob@example.com); Ann's profile id."""
    harness.identify("u-ann", traits=ANN)
    harness.identify("u-bob", traits=BOB)
    profile_id: str = harness.events()[0].profile_id
    return profile_id


def confirmation(harness: Any, order_id: Any, user: Any = ANN, **fields: Any) -> Any:
    return harness.event(user, {"confirmation": {"orderId": order_id, "total": 10, **fields}})


def orders(harness: Any) -> list[Any]:
    return [json.loads(e.payload)["properties"] for e in harness.events(name="Order Completed")]


# -- confirmations ------------------------------------------------------------------------


@pytest.mark.parametrize(("first", "second"), [(7, "7"), ("7", 7), (7, 7), ("A-1", "A-1")])
def test_a_second_confirmation_of_an_order_is_answered_200_and_discarded(
    harness: Any, first: Any, second: Any
) -> None:
    profile_id = known(harness)
    accepted = confirmation(harness, first)
    assert accepted.json == created(profile_id=profile_id)
    repeated = confirmation(harness, second, total=20)
    assert repeated.status == 200
    assert repeated.json == created(discarded="duplicate_order_id")
    assert orders(harness) == [{"orderId": first, "total": 10}]
    (rejection,) = harness.rejections()
    assert (rejection.reason, rejection.source_id) == ("duplicate_order_id", "shop")
    payload = json.loads(rejection.payload)
    assert payload["properties"] == {"orderId": second, "total": 20}
    assert (payload["eventType"], payload["user"]) == ("confirmation", ANN)


def test_an_order_is_one_order_whoever_confirms_it_and_however_the_id_is_spelled(
    harness: Any,
) -> None:
    known(harness)
    assert "profile_id" in confirmation(harness, 7).json["results"]
    by_bob = harness.event({"_id": "u-bob"}, {"confirmation": {"order_id": "7"}})
    assert by_bob.json == created("_id", discarded="duplicate_order_id")
    other_order = confirmation(harness, 8)
    assert "profile_id" in other_order.json["results"]
    assert [o["orderId"] for o in orders(harness)] == [7, 8]


def test_confirmations_without_an_order_id_are_not_deduplicated(harness: Any) -> None:
    known(harness)
    for _ in range(2):
        answer = harness.event(ANN, {"confirmation": {"total": 5}})
        assert "profile_id" in answer.json["results"]
    assert len(orders(harness)) == 2
    assert harness.rejections() == []
    warnings = [e.warnings for e in harness.events(name="Order Completed")]
    assert warnings == [("confirmation without an order id: not deduplicated",)] * 2


def test_an_order_completed_sent_through_segment_counts_in_the_same_source(
    harness: Any,
) -> None:
    known(harness)
    harness.track("Order Completed", userId="u-ann", properties={"order_id": 7, "total": 10})
    answer = confirmation(harness, "7")
    assert answer.json == created(discarded="duplicate_order_id")
    assert [r.reason for r in harness.rejections()] == ["duplicate_order_id"]
    # ... and the other way round.
    confirmation(harness, 9)
    harness.track("Order Completed", userId="u-ann", properties={"order_id": "9"})
    assert [r.reason for r in harness.rejections()] == ["duplicate_order_id"] * 2
    assert [o.get("order_id", o.get("orderId")) for o in orders(harness)] == [7, 9]


def test_an_order_of_another_source_is_another_order(harness: Any) -> None:
    known(harness)
    harness.track("Order Completed", key=OTHER_KEY, userId="u-ann", properties={"order_id": 7})
    answer = confirmation(harness, 7)
    assert "profile_id" in answer.json["results"]
    again_elsewhere = harness.event(ANN, {"confirmation": {"orderId": 7}}, key=OTHER_KEY)
    assert again_elsewhere.json == created(discarded="duplicate_order_id")
    assert [e.source_id for e in harness.events(name="Order Completed")] == ["shop-b", "shop"]


def test_confirmation_dedup_can_be_turned_off(make_harness: Any) -> None:
    source = Source(write_key=KEY, id="shop", restrictions=Restrictions(confirmation_dedup=False))
    harness = make_harness("core", "sqlite", sources=[source])
    known(harness)
    for _ in range(2):
        assert "profile_id" in confirmation(harness, 7).json["results"]
    assert len(orders(harness)) == 2
    assert harness.rejections() == []


def test_a_confirmation_for_an_unknown_user_claims_no_order(harness: Any) -> None:
    known(harness)
    refused = confirmation(harness, 7, user={"email": "nobody@example.com"})
    assert refused.status == 400
    assert refused.json["errors"][0]["code"] == "unknown_user"
    accepted = confirmation(harness, 7)
    assert "profile_id" in accepted.json["results"]


# -- email opens ---------------------------------------------------------------------------


def email_open(harness: Any, user: Any = ANN, **attributes: Any) -> Any:
    return harness.event(user, {"email_open": {"email_id": "e-1", **attributes}})


def opened(harness: Any) -> int:
    return len(harness.events(name="Email Opened"))


def test_an_email_open_within_20_minutes_is_discarded_and_one_after_is_accepted(
    harness: Any, clock: Any
) -> None:
    profile_id = known(harness)
    assert email_open(harness).json == created(profile_id=profile_id)
    clock.advance(WINDOW - 1)
    throttled = email_open(harness)
    assert throttled.status == 200
    assert throttled.json == created(discarded="email_open_throttled")
    (rejection,) = harness.rejections()
    assert (rejection.reason, rejection.source_id) == ("email_open_throttled", "shop")
    assert json.loads(rejection.payload)["eventType"] == "email_open"
    clock.advance(1)  # 20 minutes after the accepted one: a new window
    assert email_open(harness).json == created(profile_id=profile_id)
    clock.advance(60)
    assert email_open(harness).json == created(discarded="email_open_throttled")
    assert opened(harness) == 2


def test_email_opens_are_throttled_per_email_campaign_and_user(harness: Any) -> None:
    known(harness)
    accepted = [
        email_open(harness),
        email_open(harness, email_id="e-2"),
        email_open(harness, campaign_id="c-1"),
        email_open(harness, email_id="e-2", campaign_id="c-1"),
        harness.event(ANN, {"email_open": {"campaignId": "c-2"}}),
        email_open(harness, user=BOB),
    ]
    assert all("profile_id" in a.json["results"] for a in accepted)
    throttled = [
        email_open(harness),
        email_open(harness, emailId="e-2"),
        email_open(harness, user={"email": "ANN@example.com"}, campaign_id="c-1"),
        email_open(harness, user=BOB),
    ]
    assert all(t.json["results"].get("discarded") == "email_open_throttled" for t in throttled)
    assert opened(harness) == 6
    assert [r.reason for r in harness.rejections()] == ["email_open_throttled"] * 4


def test_the_email_open_window_is_configurable(make_harness: Any, clock: Any) -> None:
    source = Source(write_key=KEY, id="shop", restrictions=Restrictions(email_open_window=60))
    harness = make_harness("core", "sqlite", sources=[source])
    known(harness)
    assert "profile_id" in email_open(harness).json["results"]
    clock.advance(59)
    assert email_open(harness).json["results"]["discarded"] == "email_open_throttled"
    clock.advance(1)
    assert "profile_id" in email_open(harness).json["results"]
    assert opened(harness) == 2


def test_the_email_open_throttle_can_be_turned_off(make_harness: Any) -> None:
    source = Source(write_key=KEY, id="shop", restrictions=Restrictions(email_open_window=None))
    harness = make_harness("core", "memory", sources=[source])
    known(harness)
    for _ in range(3):
        assert "profile_id" in email_open(harness).json["results"]
    assert opened(harness) == 3
    assert harness.rejections() == []


def test_an_email_opened_sent_through_segment_starts_the_same_window(
    harness: Any, clock: Any
) -> None:
    known(harness)
    harness.track("Email Opened", userId="u-ann", properties={"email_id": "e-1"})
    clock.advance(60)
    answer = email_open(harness, user={"_id": "u-ann"})
    assert answer.json == created("_id", discarded="email_open_throttled")


def test_the_window_runs_from_the_events_time(harness: Any, clock: Any) -> None:
    """The claim is made at the event's (server-corrected) time: an open the client
    dates 30 minutes back does not block one made now."""
    known(harness)
    past = "2023-11-14T21:43:20.000Z"  # START - 30 minutes
    backdated = harness.event(ANN, {"email_open": {"email_id": "e-1"}}, timestamp=past)
    assert "profile_id" in backdated.json["results"]
    assert "profile_id" in email_open(harness).json["results"]


# -- bots ----------------------------------------------------------------------------------

CRAWLER = {
    "user-agent": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "origin": "https://shop.example",
}


def test_a_crawlers_user_event_is_answered_200_discarded_and_recorded(harness: Any) -> None:
    profile_id = known(harness)
    answer = harness.event(ANN, {"update": {"plan": "bot"}}, headers=CRAWLER)
    assert answer.json == created(discarded="bot")
    (rejection,) = harness.rejections()
    assert (rejection.reason, rejection.source_id) == ("bot", "shop")
    assert "plan" not in harness.profile(profile_id).traits
    assert len(harness.events()) == 2  # the two identifies


# -- idempotent retries -------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        {"update": {"plan": "pro"}},
        {"login": {"email": "ann@example.com"}},
        {"generic": {"event_name": "Video Played"}},
        {"confirmation": {"orderId": 7}},
        {"email_open": {"email_id": "e-1"}},
    ],
)
def test_a_retry_with_the_same_message_id_is_stored_once_and_answered_200(
    harness: Any, clock: Any, event: Any
) -> None:
    profile_id = known(harness)
    first = harness.event(ANN, event, messageId="m-retry")
    clock.advance(5)
    second = harness.event(ANN, event, messageId="m-retry")
    assert first.json == created(profile_id=profile_id)
    assert second.status == 200
    assert second.json["results"]["message"] == "Event created"
    identifier_and_duplicate = {"message": "Event created", "email": CREATED, "duplicate": True}
    assert second.json == {"results": identifier_and_duplicate}
    stored = [e for e in harness.events() if e.message_id == "m-retry"]
    assert len(stored) == 1
    assert [r.reason for r in harness.rejections()] == ["duplicate_message_id"]


def test_the_same_message_id_in_another_source_is_another_event(harness: Any) -> None:
    known(harness)
    harness.event(ANN, {"update": {"a": 1}}, messageId="m-1")
    answer = harness.event(ANN, {"update": {"a": 1}}, messageId="m-1", key=OTHER_KEY)
    assert "profile_id" in answer.json["results"]
    assert [e.source_id for e in harness.events() if e.message_id == "m-1"] == ["shop", "shop-b"]


def test_a_retry_of_an_event_refused_for_an_unknown_user_is_stored_once_the_user_exists(
    harness: Any,
) -> None:
    answer = harness.event({"email": "eve@example.com"}, {"update": {"a": 1}}, messageId="m-eve")
    assert answer.status == 400
    harness.identify("u-eve", traits={"email": "eve@example.com"})
    retried = harness.event({"email": "eve@example.com"}, {"update": {"a": 1}}, messageId="m-eve")
    assert "profile_id" in retried.json["results"]
    assert [e.message_id for e in harness.events(type="identify")][-1] == "m-eve"


def test_retries_through_the_adapters_are_stored_once(adapter: Any) -> None:
    known(adapter)
    bodies = [
        adapter.event(ANN, {"confirmation": {"orderId": 1}}, messageId="m-a") for _ in range(2)
    ]
    assert [b.status for b in bodies] == [200, 200]
    assert len(orders(adapter)) == 1


def test_concurrent_confirmations_of_one_order_store_exactly_one(make_harness: Any) -> None:
    harness = make_harness("core", "sqlite")
    known(harness)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: confirmation(harness, 77, n=i), range(8)))
    assert [a.status for a in answers] == [200] * 8
    kept = [a for a in answers if "profile_id" in a.json["results"]]
    assert len(kept) == 1 and len(orders(harness)) == 1
    assert [r.reason for r in harness.rejections()] == ["duplicate_order_id"] * 7


# -- restricted by name, ids written as numbers, limits of the throttle ----------------


@pytest.mark.parametrize(
    ("attributes", "second"),
    [
        ({"event_name": "Order Completed", "orderId": 5}, {"confirmation": {"orderId": 5}}),
        ({"event_name": "Email Opened", "email_id": "e-1"}, {"email_open": {"email_id": "e-1"}}),
    ],
    ids=["order", "email-open"],
)
def test_a_generic_event_with_a_restricted_name_is_restricted_too(
    harness: Any, attributes: dict[str, Any], second: Any
) -> None:
    known(harness)
    first = harness.event(ANN, {"generic": attributes})
    assert "profile_id" in first.json["results"]
    again = harness.event(ANN, second)
    assert again.status == 200
    assert "discarded" in again.json["results"]
    assert len(harness.events(name=attributes["event_name"])) == 1


def test_an_order_id_sent_as_7_0_is_deduplicated(harness: Any) -> None:
    known(harness)
    raw = b'{"writeKey": "ue-key", "user": {"email": "ann@example.com"}, "event": '
    first = harness.send("/v1/event", raw=raw + b'{"confirmation": {"orderId": 7.0}}}')
    assert "profile_id" in first.json["results"]
    assert harness.events(name="Order Completed")[0].warnings == ()
    again = confirmation(harness, 7.0)
    assert again.json == created(discarded="duplicate_order_id")


def test_the_email_open_throttle_counts_the_identifier_the_event_names_the_user_by(
    harness: Any,
) -> None:
    """As the README documents ("one person sending under two identifiers is throttled per
    identifier"): Ann by email, by userId and by profile id gets one open each. The seed
    says one per user; see the report."""
    profile_id = known(harness)
    for user in (ANN, {"_id": "u-ann"}, {"_id": profile_id}):
        assert "profile_id" in email_open(harness, user=user).json["results"], user
    for user in (ANN, {"_id": "u-ann"}, {"_id": profile_id}):
        answer = email_open(harness, user=user)
        assert answer.json["results"].get("discarded") == "email_open_throttled", user
    assert opened(harness) == 3
