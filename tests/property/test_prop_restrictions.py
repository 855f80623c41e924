"""Restrictions against reference models, driven through the collector with a fake clock.

* Email opens: for any sequence of opens (any users, campaigns, times, in any arrival
  order, through any dialect), the stored ones are exactly those a reference model keeps:
  an open is kept when no kept open of the same user and campaign holds its window.
* Confirmations: for any interleaving of confirmations of a few orders, sent through
  any dialect, exactly one per order id is stored, the first to arrive.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from fp_collect import Collector, Request, Restrictions, Source
from fp_collect.timestamps import format_iso

KEY = "prop-key"
NOW = 1_700_000_000.0
WINDOW = 1200.0
DIALECTS = ("segment", "firstparty", "userevent")
USERS = ("u-1", "u-2")


@contextmanager
def collector(window: float | None = WINDOW) -> Iterator[Collector]:
    source = Source(write_key=KEY, id="site", restrictions=Restrictions(email_open_window=window))
    made = Collector(sources=[source], storage="memory://", clock=lambda: NOW)
    try:
        yield made
    finally:
        made.close()


def send(collector: Collector, path: str, body: dict[str, Any]) -> None:
    route = collector.route(path)
    assert route is not None
    headers = {"content-type": "application/json", "user-agent": "analytics-python/2.3.3"}
    request = Request("POST", path, "", headers, json.dumps(body).encode(), "10.0.0.1")
    response = collector.handle(route, request)
    assert response.status == 200, response.body


def track(
    dialect: str, user: str, name: str, properties: dict[str, Any], **extra: Any
) -> tuple[str, dict[str, Any]]:
    """The same track event as each dialect spells it: (path, body)."""
    if dialect == "segment":
        body = {"writeKey": KEY, "userId": user, "event": name, "properties": properties}
        return "/v1/track", {**body, **extra}
    if dialect == "firstparty":
        body = {"write_key": KEY, "user_id": user, "event": name, "properties": properties}
        if "messageId" in extra:
            extra["message_id"] = extra.pop("messageId")
        return "/events/track", {**body, **extra}
    kind = {"Email Opened": "email_open", "Order Completed": "confirmation"}[name]
    body = {"writeKey": KEY, "user": {"_id": user}, "event": {kind: properties}}
    return "/v1/event", {**body, **extra}


def identify_everyone(collector: Collector) -> None:
    """The user-event API only speaks of users who exist."""
    for user in USERS:
        send(collector, "/v1/identify", {"writeKey": KEY, "userId": user, "messageId": user})


opens = st.lists(
    st.tuples(
        st.sampled_from(USERS),
        st.sampled_from([None, "c-1", "c-2"]),  # campaign id
        st.integers(min_value=0, max_value=4 * int(WINDOW)),  # seconds after the epoch base
        st.sampled_from(DIALECTS),
    ),
    max_size=25,
)


@given(opens)
@example([("u-1", None, 0, "segment"), ("u-1", None, 1199, "userevent"),
          ("u-1", None, 1200, "firstparty"), ("u-1", None, 1, "segment")])  # fmt: skip
@example([("u-1", None, 2400, "segment"), ("u-1", None, 1300, "segment"),
          ("u-1", None, 0, "segment")])  # fmt: skip
def test_email_opens_kept_are_exactly_the_reference_models(
    sequence: list[tuple[str, str | None, int, str]],
) -> None:
    base = NOW - 10 * WINDOW  # every open lies in the past, so none is moved
    expected: list[str] = []
    held_until: dict[tuple[str, str | None], float] = {}
    for index, (user, campaign, offset, _dialect) in enumerate(sequence):
        at = base + offset
        if held_until.get((user, campaign), float("-inf")) <= at:
            held_until[(user, campaign)] = at + WINDOW
            expected.append(f"open-{index}")

    with collector() as made:
        identify_everyone(made)
        for index, (user, campaign, offset, dialect) in enumerate(sequence):
            properties = {"campaign_id": campaign} if campaign else {}
            path, body = track(
                dialect,
                user,
                "Email Opened",
                properties,
                messageId=f"open-{index}",
                timestamp=format_iso(base + offset),
            )
            send(made, path, body)
        kept = [e.message_id for e in made.store.events() if e.name == "Email Opened"]
        throttled: list[str] = []
        for rejection in made.store.rejections():
            assert rejection.message_id is not None  # every open is sent with one
            throttled.append(rejection.message_id)
    assert kept == expected
    assert sorted(throttled) == sorted(set(f"open-{i}" for i in range(len(sequence))) - set(kept))


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["o-1", "o-2", "o-3", 4]),  # numbers and strings alike
            st.sampled_from(USERS),
            st.sampled_from(DIALECTS),
        ),
        max_size=20,
    )
)
def test_exactly_one_confirmation_per_order_is_stored(
    sequence: list[tuple[str | int, str, str]],
) -> None:
    with collector() as made:
        identify_everyone(made)
        for index, (order, user, dialect) in enumerate(sequence):
            field = "orderId" if index % 2 else "order_id"
            path, body = track(
                dialect, user, "Order Completed", {field: order}, messageId=f"c-{index}"
            )
            send(made, path, body)
        stored = [e for e in made.store.events() if e.name == "Order Completed"]
        refused = [r for r in made.store.rejections() if r.reason == "duplicate_order_id"]
    first_of_each: dict[str, str] = {}
    for index, (order, _user, _dialect) in enumerate(sequence):
        first_of_each.setdefault(str(order), f"c-{index}")
    assert [e.message_id for e in stored] == sorted(first_of_each.values(), key=_index)
    assert len(refused) == len(sequence) - len(first_of_each)


def _index(message_id: str) -> int:
    return int(message_id.split("-")[1])


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=10))
def test_without_a_window_every_open_is_kept(offsets: list[int]) -> None:
    with collector(window=None) as made:
        for index, offset in enumerate(offsets):
            path, body = track(
                "segment",
                "u-1",
                "Email Opened",
                {},
                messageId=f"m-{index}",
                timestamp=format_iso(NOW - 20_000 + offset),
            )
            send(made, path, body)
        assert len(list(made.store.events())) == len(offsets)
