"""The Firstparty Events API: /events/track and /events/track/bulk, profiles, sessions."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fp_collect import Collector, Request, Source
from fp_collect.store.base import Query

KEY = "fp-key"
PROFILE_ID = re.compile(r"PR[0-9A-F]{30}")


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def collector(clock: Clock) -> Iterator[Collector]:
    sources = [Source(write_key=KEY, id="site"), Source(write_key="no-sessions", id="app",
                                                         session_timeout=None)]  # fmt: skip
    made = Collector(sources=sources, storage="memory://", clock=clock, prefix="/fp")
    yield made
    made.close()


def post(collector: Collector, path: str, body: Any, **headers: str) -> dict[str, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    route = collector.route("/fp" + path)
    assert route is not None
    request = Request(
        "POST", "/fp" + path, "", {"content-type": "application/json", **headers}, raw, "10.0.0.1"
    )
    response = collector.handle(route, request)
    assert response.status == 200  # the seed's promise, whatever happened
    answer: dict[str, Any] = json.loads(response.body)
    return answer


def test_a_minimal_event_creates_a_profile_and_a_session(collector: Collector) -> None:
    answer = post(collector, "/events/track", {"event": "Newsletter Signup", "write_key": KEY})
    assert answer["success"] is True
    assert PROFILE_ID.fullmatch(answer["profile_id"])
    assert answer["session_id"].startswith("SE")
    (event,) = collector.store.events()
    assert (event.source_id, event.type, event.name) == ("site", "track", "Newsletter Signup")
    assert (event.profile_id, event.session_id) == (answer["profile_id"], answer["session_id"])
    payload = json.loads(event.payload)
    assert "write_key" not in payload and payload["context"]["ip"] == "10.0.0.1"


def test_the_seeds_name_field_and_full_payload_are_accepted(collector: Collector) -> None:
    body = {
        "profile_id": "PR123456789012345678901234567890",
        "name": "Form Completed",
        "properties": {"email": "stevie@rosebudmotels.com", "name": "Stevie Budd"},
        "context": {"ip": "12.34.56.78"},
        "write_key": KEY,
    }
    answer = post(collector, "/events/track", body)
    assert answer["profile_id"] == "PR123456789012345678901234567890"
    payload = json.loads(next(iter(collector.store.events())).payload)
    assert payload["event"] == "Form Completed" and "name" not in payload
    assert payload["properties"] == body["properties"]
    assert payload["context"]["ip"] == "12.34.56.78"  # the client's own value wins


def test_the_profile_and_session_are_reused_until_the_timeout(
    collector: Collector, clock: Clock
) -> None:
    first = post(collector, "/events/track", {"event": "Page Viewed", "write_key": KEY})
    clock.now += 29 * 60
    same = post(collector, "/events/track", {"event": "Page Viewed", "write_key": KEY,
                                             "profile_id": first["profile_id"]})  # fmt: skip
    clock.now += 30 * 60
    later = post(collector, "/events/track", {"event": "Page Viewed", "write_key": KEY,
                                              "profile_id": first["profile_id"]})  # fmt: skip
    assert same["session_id"] == first["session_id"]
    assert later["session_id"] != first["session_id"]
    assert later["profile_id"] == first["profile_id"]


def test_id_lengths_an_email_address_may_be_long_a_profile_id_may_not(
    collector: Collector,
) -> None:
    """Identities and message ids may be as long as Segment-spec ids (255): an email
    address may have 254 characters. Profile and session ids are the collector's own
    (32 characters), so a client's may have 64."""
    email = "a" * 242 + "@example.com"
    assert len(email) == 254
    ok = post(collector, "/events/track", {"event": "Mail Opened", "write_key": KEY,
                                            "email": email, "user_id": "u" * 255})  # fmt: skip
    assert ok["success"] is True, ok
    for field, value in (
        ("user_id", "u" * 256),
        ("email", "a" * 244 + "@example.com"),
        ("message_id", "m" * 256),
        ("profile_id", "PR" + "0" * 63),
        ("session_id", "SE" + "0" * 63),
    ):
        refused = post(collector, "/events/track", {"event": "Mail Opened", "write_key": KEY,
                                                     field: value})  # fmt: skip
        assert (refused["success"], refused["code"]) == (False, "invalid_field"), field
        assert field in refused["message"]
    assert len(list(collector.store.events())) == 1


def test_sessions_can_be_turned_off_per_source(collector: Collector) -> None:
    answer = post(collector, "/events/track", {"event": "App Opened", "write_key": "no-sessions"})
    assert answer["success"] is True and answer["session_id"] is None


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"event": "Page Viewed"}, "invalid_write_key"),
        ({"event": "Page Viewed", "write_key": "nope"}, "invalid_write_key"),
        ({"write_key": KEY}, "missing_event"),
        ({"event": "  ", "write_key": KEY}, "missing_event"),
        ({"event": "Page Viewed", "write_key": KEY, "properties": [1]}, "invalid_field"),
        ({"event": "Page Viewed", "write_key": KEY, "profile_id": 5}, "invalid_field"),
        ({"event": "Page Viewed", "write_key": KEY, "timestamp": "soon"}, "invalid_timestamp"),
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_body"),
        (b'{"event": "x", "write_key": "fp-key", "pad": "' + b"x" * 20000 + b'"}',
         "payload_too_large"),
    ],
)  # fmt: skip
def test_every_problem_is_answered_200_and_recorded(
    collector: Collector, body: Any, code: str
) -> None:
    answer = post(collector, "/events/track", body)
    assert answer == {"success": False, "code": code, "message": answer["message"]}
    assert list(collector.store.events()) == []
    (rejection,) = collector.store.rejections()
    assert rejection.reason == code and rejection.endpoint == "/fp/events/track"
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert rejection.payload == raw.decode()


def test_basic_auth_works_too(collector: Collector) -> None:
    header = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
    answer = post(collector, "/events/track", {"event": "Page Viewed"}, authorization=header)
    assert answer["success"] is True


@pytest.mark.parametrize("shape", ["array", "object"])
def test_bulk_answers_per_event_and_refuses_only_the_bad_ones(
    collector: Collector, shape: str
) -> None:
    events: list[Any] = [
        {"event": "Page Viewed", "write_key": KEY},
        {"event": "Page Viewed"},  # no key of its own
        {"write_key": KEY},
        "not an event",
        {"event": "Cart Viewed", "write_key": "no-sessions"},
    ]
    body: Any = events if shape == "array" else {"events": events, "write_key": KEY}
    answer = post(collector, "/events/track/bulk", body)
    results = answer["events"]
    assert answer["success"] is False
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    assert [r["success"] for r in results] == [True, shape == "object", False, False, True]
    assert [r.get("code") for r in results][2:4] == ["missing_event", "invalid_event"]
    stored = list(collector.store.events())
    assert [e.profile_id for e in stored] == [r["profile_id"] for r in results if r["success"]]
    assert {r.index for r in collector.store.rejections()} == (
        {2, 3} if shape == "object" else {1, 2, 3}
    )


@pytest.mark.parametrize("shape", ["array", "object"])
def test_bulk_refuses_an_event_with_a_huge_integer_alone(collector: Collector, shape: str) -> None:
    good = b'{"event":"Page Viewed","write_key":"%s"}' % KEY.encode()
    bad = b'{"event":"Page Viewed","write_key":"%s","properties":{"n":18446744073709551617}}' % (
        KEY.encode()
    )
    events = b"[" + good + b"," + bad + b"]"
    body = events if shape == "array" else b'{"events":' + events + b"}"
    answer = post(collector, "/events/track/bulk", body)
    assert [(r["success"], r.get("code")) for r in answer["events"]] == [
        (True, None),
        (False, "invalid_json"),
    ]
    assert len(list(collector.store.events())) == 1
    assert [(r.reason, r.index) for r in collector.store.rejections()] == [("invalid_json", 1)]


def test_bulk_with_no_valid_key_anywhere_is_refused_once(collector: Collector) -> None:
    answer = post(collector, "/events/track/bulk", [{"event": "Page Viewed"}] * 100 + [0])
    assert (answer["success"], answer["code"]) == (False, "invalid_write_key")
    assert [(r.reason, r.index) for r in collector.store.rejections()] == [
        ("invalid_write_key", None)
    ]


@pytest.mark.parametrize("shape", ["object", "array"])
def test_an_empty_bulk_is_refused_as_empty_under_its_source(
    collector: Collector, shape: str
) -> None:
    """No events is not a bad key: refused as ``empty_batch`` (as ``/v1/batch`` does),
    recorded under the source its key names."""
    if shape == "object":
        answer = post(collector, "/events/track/bulk", {"events": [], "write_key": KEY})
    else:
        auth = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
        answer = post(collector, "/events/track/bulk", [], authorization=auth)
    assert (answer["success"], answer["code"]) == (False, "empty_batch")
    assert [(r.reason, r.source_id) for r in collector.store.rejections()] == [
        ("empty_batch", "site")
    ]


def test_bulk_of_more_events_than_the_limit_is_refused_once(collector: Collector) -> None:
    answer = post(collector, "/events/track/bulk", {"write_key": KEY, "events": [0] * 2501})
    assert (answer["success"], answer["code"]) == (False, "payload_too_large")
    assert [r.reason for r in collector.store.rejections()] == ["payload_too_large"]


def test_bulk_refuses_an_event_over_the_per_event_limit_alone(collector: Collector) -> None:
    """15 KiB per event, as on /events/track and in a /v1/batch."""
    big = {"event": "Page Viewed", "write_key": KEY, "properties": {"x": "y" * 16_000}}
    small = {"event": "Page Viewed", "write_key": KEY}
    answer = post(collector, "/events/track/bulk", [small, big, small])
    assert [(r["success"], r.get("code")) for r in answer["events"]] == [
        (True, None),
        (False, "event_too_large"),
        (True, None),
    ]
    assert len(list(collector.store.events())) == 2
    assert [(r.reason, r.index) for r in collector.store.rejections()] == [("event_too_large", 1)]


@pytest.mark.parametrize("keyed", ["basic", "shared"])
def test_bulk_refusals_with_a_valid_key_are_its_sources_whatever_the_setting(
    clock: Clock, keyed: str
) -> None:
    collector = Collector(
        sources=[Source(write_key=KEY, id="fp")],
        storage="memory://",
        prefix="/fp",
        record_unauthenticated=False,
        clock=clock,
    )
    events: list[Any] = [{"event": "Page Viewed"}, 7]
    if keyed == "basic":
        auth = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
        answer = post(collector, "/events/track/bulk", events, authorization=auth)
    else:
        answer = post(collector, "/events/track/bulk", {"events": events, "write_key": KEY})
    assert [r["success"] for r in answer["events"]] == [True, False]
    assert [(r.reason, r.index, r.source_id) for r in collector.store.rejections()] == [
        ("invalid_event", 1, "fp")
    ]
    collector.close()


def test_bulk_whole_body_problems_are_200_and_recorded(collector: Collector) -> None:
    answer = post(collector, "/events/track/bulk", {"events": "nope"})
    assert answer["success"] is False and answer["code"] == "invalid_batch"
    assert [r.reason for r in collector.store.rejections()] == ["invalid_batch"]


def test_a_retried_message_id_is_stored_once(collector: Collector) -> None:
    body = {"event": "Order Completed", "write_key": KEY, "message_id": "order-1"}
    assert post(collector, "/events/track", body)["success"] is True
    assert post(collector, "/events/track", body) == {"success": True, "duplicate": True}
    assert len(list(collector.store.events())) == 1


def test_segment_and_firstparty_share_one_identity_graph(collector: Collector) -> None:
    identify = {"userId": "u-7", "anonymousId": "anon-7", "traits": {"email": "Ann@Example.com",
                                                                    "plan": "pro"}}  # fmt: skip
    route = collector.route("/fp/v1/identify")
    assert route is not None
    header = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
    response = collector.handle(route, Request("POST", "/fp/v1/identify", "", {
        "authorization": header, "content-type": "application/json"},
        json.dumps(identify).encode()))  # fmt: skip
    assert response.status == 200
    answer = post(collector, "/events/track", {"event": "Form Completed", "write_key": KEY,
                                               "email": "ann@example.com"})  # fmt: skip
    profile = collector.store.profile(answer["profile_id"])
    assert profile is not None and profile.traits == identify["traits"]
    assert {(i.kind, i.value) for i in profile.identities} == {
        ("user_id", "u-7"), ("anonymous_id", "anon-7"), ("email", "ann@example.com")}  # fmt: skip
    events = list(collector.store.events(Query(source_id="site")))
    assert len({e.profile_id for e in events}) == 1


@given(st.lists(st.one_of(st.none(), st.sampled_from(["known-0", "known-1"])), max_size=12))
def test_response_ids_are_the_stored_ones_and_anonymous_visitors_get_one_new_profile(
    plan: list[str | None],
) -> None:
    """For any sequence of events with and without profile ids: every answer names the
    ids stored with its event; each event without a profile_id gets a fresh profile."""
    clock = Clock()
    collector = Collector(sources=[Source(write_key=KEY, id="site")], storage="memory://",
                          clock=clock, prefix="/fp")  # fmt: skip
    answers = []
    known: dict[str, str] = {}
    for step in plan:
        clock.now += 60
        body: dict[str, Any] = {"event": "Page Viewed", "write_key": KEY}
        if step is not None and step in known:
            body["profile_id"] = known[step]
        answer = post(collector, "/events/track", body)
        if step is not None:
            known.setdefault(step, answer["profile_id"])
        answers.append(answer)
    stored = list(collector.store.events())
    assert [(e.profile_id, e.session_id) for e in stored] == [
        (a["profile_id"], a["session_id"]) for a in answers
    ]
    fresh: list[str] = []
    for index, (answer, step) in enumerate(zip(answers, plan, strict=True)):
        if step is None or plan.index(step) == index:
            fresh.append(answer["profile_id"])  # no profile_id sent: a new profile
        else:
            assert answer["profile_id"] == known[step]
    assert len(set(fresh)) == len(fresh)
    assert {a["profile_id"] for a in answers} == set(fresh)
    collector.close()


@given(st.lists(st.floats(min_value=0, max_value=4000, allow_nan=False), min_size=1, max_size=15))
def test_sessions_split_exactly_at_the_inactivity_timeout(gaps: list[float]) -> None:
    """Against a reference model: a new session starts exactly when the gap since the
    profile's previous event reaches the timeout (1800 s)."""
    clock = Clock()
    collector = Collector(sources=[Source(write_key=KEY, id="site")], storage="memory://",
                          clock=clock, prefix="/fp")  # fmt: skip
    first = post(collector, "/events/track", {"event": "Page Viewed", "write_key": KEY})
    sessions = [first["session_id"]]
    expected = [0]
    for gap in gaps:
        clock.now += gap
        answer = post(collector, "/events/track", {"event": "Page Viewed", "write_key": KEY,
                                                   "profile_id": first["profile_id"]})  # fmt: skip
        sessions.append(answer["session_id"])
        expected.append(expected[-1] + 1 if gap >= 1800 else expected[-1])
    # Same session number <=> same session id.
    numbering = {session: n for n, session in zip(expected, sessions, strict=True)}
    assert len(numbering) == len(set(expected))
    assert [numbering[s] for s in sessions] == expected
    collector.close()
