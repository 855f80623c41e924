"""Every answer of ``POST /v1/event`` in the seed's shapes, through Flask and Starlette.

200 ``{"results": {"message": "Event created", "<email|_id>": "Event was created for
the specified user", ...}}``; every refusal ``{"errors": [{"message", "description",
"code"}]}`` as JSON, never a 500, and recorded with its reason.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

from fp_collect import Source
from fp_collect.store.memory import MemoryStore

KEY = "ue-key"
ORIGIN = "https://shop.example"
ENDPOINT = "/collect/v1/event"
CREATED = "Event was created for the specified user"
PROFILE_ID = re.compile(r"PR[0-9A-F]{30}")
ANN = {"email": "ann@example.com"}
UPDATE = {"update": {"firstname": "alexandru"}}


def basic(key: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{key}:{password}".encode()).decode()


def created(identifier: str = "email", **extra: object) -> dict[str, object]:
    return {"results": {"message": "Event created", identifier: CREATED, **extra}}


def assert_error(answer: Any, status: int, code: str, title: str) -> dict[str, Any]:
    """The seed's error shape, exactly: one error with a title, a description and a code."""
    assert answer.status == status, answer.body
    assert answer.headers["content-type"] == "application/json"
    body = answer.json
    assert list(body) == ["errors"]
    (error,) = body["errors"]
    assert error == {"message": title, "description": error["description"], "code": code}
    assert isinstance(error["description"], str) and error["description"].strip()
    return dict(error)


# -- 200 ------------------------------------------------------------------------------


def test_an_event_for_a_user_named_by_email_is_created(
    adapter: Any, known_user: Callable[[Any], str]
) -> None:
    profile_id = known_user(adapter)
    assert PROFILE_ID.fullmatch(profile_id)
    answer = adapter.event(ANN, UPDATE)
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.json == created("email", profile_id=profile_id)
    (event,) = adapter.events(type="identify", profile_id=profile_id)[1:]
    payload = json.loads(event.payload)
    assert (event.source_id, payload["eventType"], payload["user"]) == ("shop", "update", ANN)
    assert adapter.profile(profile_id).traits["firstname"] == "alexandru"


def test_an_event_for_a_user_named_by_id_answers_with_the_id_key(
    adapter: Any, known_user: Callable[[Any], str]
) -> None:
    profile_id = known_user(adapter)
    by_user_id = adapter.event({"_id": "u-ann"}, UPDATE)
    by_profile_id = adapter.event({"_id": profile_id}, {"update": {"lastname": "B"}})
    assert by_user_id.status == by_profile_id.status == 200
    assert by_user_id.json == created("_id", profile_id=profile_id)
    assert by_profile_id.json == created("_id", profile_id=profile_id)
    assert "email" not in by_user_id.json["results"]


def test_the_seeds_generic_example_is_created(
    adapter: Any, known_user: Callable[[Any], str]
) -> None:
    profile_id = known_user(adapter)
    event = {"generic": {"generic": {"event_name": "my_event", "firstname": "alexandru"}}}
    answer = adapter.event(ANN, event)
    assert answer.json == created("email", profile_id=profile_id)
    (stored,) = adapter.events(type="track")
    assert (stored.name, stored.profile_id) == ("my_event", profile_id)


# -- 400: what the body says ---------------------------------------------------------

# (body without the write key, the error's code, its title)
REFUSED: list[tuple[Any, str, str]] = [
    ({"user": ANN}, "missing_event", "Missing event information"),
    ({"user": ANN, "event": None}, "missing_event", "Missing event information"),
    ({"user": ANN, "event": {}}, "missing_event", "Missing event information"),
    ({"event": UPDATE}, "missing_user", "Missing user information"),
    ({"user": {}, "event": UPDATE}, "missing_user", "Missing user information"),
    ({"user": {"name": "Ann"}, "event": UPDATE}, "missing_user", "Missing user information"),
    ({"user": "ann@example.com", "event": UPDATE}, "invalid_user", "Invalid user information"),
    (
        {"user": {"email": "not-an-email"}, "event": UPDATE},
        "invalid_user",
        "Invalid user information",
    ),
    ({"user": {"_id": 42}, "event": UPDATE}, "invalid_user", "Invalid user information"),
    ({"user": {"_id": ""}, "event": UPDATE}, "invalid_user", "Invalid user information"),
    ({"user": {"_id": "x" * 256}, "event": UPDATE}, "invalid_user", "Invalid user information"),
    (
        {"user": ANN, "event": {"purchase": {"total": 5}}},
        "unknown_event_type",
        "Unknown event type",
    ),
    (
        {"user": ANN, "event": {"update": {"a": 1}, "login": {"b": 2}}},
        "invalid_event",
        "Invalid event information",
    ),
    ({"user": ANN, "event": "update"}, "invalid_event", "Invalid event information"),
    ({"user": ANN, "event": ["update"]}, "invalid_event", "Invalid event information"),
    (
        {"user": ANN, "event": {"update": ["firstname"]}},
        "invalid_event",
        "Invalid event information",
    ),
    (
        {"user": ANN, "event": {"generic": {"firstname": "a"}}},
        "invalid_event",
        "Invalid event information",
    ),
    ({"user": ANN, "event": UPDATE, "messageId": 12}, "invalid_event", "Invalid event information"),
    (
        {"user": ANN, "event": UPDATE, "timestamp": "yesterday"},
        "invalid_event",
        "Invalid event information",
    ),
    (
        {"user": ANN, "event": UPDATE, "context": "web"},
        "invalid_event",
        "Invalid event information",
    ),
]


@pytest.mark.parametrize(("body", "code", "title"), REFUSED)
def test_a_bad_event_is_400_in_the_errors_shape_and_recorded(
    adapter: Any, known_user: Callable[[Any], str], body: Any, code: str, title: str
) -> None:
    known_user(adapter)
    sent = {**body, "writeKey": KEY}
    answer = adapter.send("/v1/event", sent)
    error = assert_error(answer, 400, code, title)
    if code == "missing_event":
        assert error["description"] == "Please send event information along with user"
    assert adapter.events(type="track") == []
    assert len(adapter.events()) == 1  # Ann's identify only
    (rejection,) = adapter.rejections()
    assert (rejection.reason, rejection.source_id, rejection.endpoint) == (code, "shop", ENDPOINT)
    assert json.loads(rejection.payload) == sent


def test_an_unknown_user_is_400_user_not_found_and_the_event_is_kept_as_a_rejection(
    adapter: Any, known_user: Callable[[Any], str]
) -> None:
    known_user(adapter)
    answer = adapter.event({"email": "nobody@example.com"}, UPDATE, messageId="m-lost")
    assert_error(answer, 400, "unknown_user", "User not found")
    by_id = adapter.event({"_id": "u-nobody"}, {"confirmation": {"orderId": 1}})
    assert_error(by_id, 400, "unknown_user", "User not found")
    assert len(adapter.events()) == 1  # Ann's identify only
    first, second = adapter.rejections()
    assert [r.reason for r in (first, second)] == ["unknown_user", "unknown_user"]
    assert (first.source_id, first.message_id) == ("shop", "m-lost")
    payload = json.loads(first.payload)
    assert payload["user"] == {"email": "nobody@example.com"}
    assert (payload["eventType"], payload["traits"]) == ("update", {"firstname": "alexandru"})
    assert json.loads(second.payload)["properties"] == {"orderId": 1}


@pytest.mark.parametrize(
    ("raw", "code", "title"),
    [
        (b'{"user": {"email": "ann@example.com"}, "event": ', "invalid_json", "Invalid JSON"),
        (b"", "invalid_json", "Invalid JSON"),
        (b"\xff\xfe{}", "invalid_json", "Invalid JSON"),
        (b'{"user": {}} trailing', "invalid_json", "Invalid JSON"),
        (b"[1, 2]", "invalid_body", "Invalid JSON"),
        (b'"an event"', "invalid_body", "Invalid JSON"),
        (b"null", "invalid_body", "Invalid JSON"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_400_and_recorded(
    adapter: Any, raw: bytes, code: str, title: str
) -> None:
    answer = adapter.send("/v1/event", raw=raw, headers={"authorization": basic(KEY)})
    assert_error(answer, 400, code, title)
    (rejection,) = adapter.rejections()
    assert (rejection.reason, rejection.endpoint) == (code, ENDPOINT)
    assert rejection.payload == raw.decode("utf-8", "backslashreplace")


# -- 413 ----------------------------------------------------------------------------


def oversize_body() -> bytes:
    body = {"writeKey": KEY, "user": ANN, "event": {"update": {"bio": "x" * 16 * 1024}}}
    data = json.dumps(body).encode()
    assert len(data) > 15 * 1024
    return data


def test_an_over_size_body_is_413_in_the_errors_shape(
    adapter: Any, known_user: Callable[[Any], str]
) -> None:
    profile_id = known_user(adapter)
    answer = adapter.send("/v1/event", raw=oversize_body())
    assert_error(answer, 413, "payload_too_large", "Request too large")
    assert "firstname" not in adapter.profile(profile_id).traits
    assert [r.reason for r in adapter.rejections()] == ["payload_too_large"]
    assert [e.type for e in adapter.events()] == ["identify"]


def test_an_over_size_chunked_body_without_content_length_is_413(
    adapter: Any, known_user: Callable[[Any], str]
) -> None:
    profile_id = known_user(adapter)
    answer = adapter.send_chunked("/v1/event", oversize_body())
    assert_error(answer, 413, "payload_too_large", "Request too large")
    assert "bio" not in adapter.profile(profile_id).traits
    assert [r.reason for r in adapter.rejections()] == ["payload_too_large"]


def test_a_chunked_body_within_the_limit_is_read_whole(
    adapter: Any, known_user: Callable[[Any], str]
) -> None:
    profile_id = known_user(adapter)
    body = {"writeKey": KEY, "user": ANN, "event": {"update": {"bio": "y" * 9000}}}
    answer = adapter.send_chunked("/v1/event", json.dumps(body).encode())
    assert answer.json == created("email", profile_id=profile_id)
    assert adapter.profile(profile_id).traits["bio"] == "y" * 9000


@pytest.mark.parametrize(("size", "status"), [(9000, 200), (200_000, 413)])
def test_a_gzip_body_is_measured_after_decompression(
    adapter: Any, known_user: Callable[[Any], str], size: int, status: int
) -> None:
    profile_id = known_user(adapter)
    body = {"writeKey": KEY, "user": ANN, "event": {"update": {"bio": " " * size}}}
    packed = gzip.compress(json.dumps(body).encode())
    assert len(packed) < 15 * 1024
    answer = adapter.send("/v1/event", raw=packed, headers={"content-encoding": "gzip"})
    if status == 200:
        assert answer.json == created("email", profile_id=profile_id)
    else:
        assert_error(answer, 413, "payload_too_large", "Request too large")
        assert "bio" not in adapter.profile(profile_id).traits


# -- 401, 403, 405, 415 ------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "", "nope", 42])
def test_an_invalid_write_key_is_401_in_the_errors_shape_and_recorded(
    adapter: Any, known_user: Callable[[Any], str], key: Any
) -> None:
    profile_id = known_user(adapter)
    body = (
        {"user": ANN, "event": UPDATE}
        if key is None
        else {"user": ANN, "event": UPDATE, "writeKey": key}
    )
    answer = adapter.send("/v1/event", body)
    error = assert_error(answer, 401, "invalid_write_key", "Invalid write key")
    assert error["description"] == "Invalid or missing writekey"
    assert answer.headers["www-authenticate"] == 'Basic realm="fp-collect"'
    (rejection,) = adapter.rejections()
    assert (rejection.reason, rejection.source_id) == ("invalid_write_key", None)
    assert json.loads(rejection.payload) == body
    assert "firstname" not in adapter.profile(profile_id).traits


@pytest.mark.parametrize("header", [basic("nope"), basic(""), "Basic !!!"])
def test_a_bad_basic_auth_key_is_401_too(adapter: Any, header: str) -> None:
    answer = adapter.send(
        "/v1/event", {"user": ANN, "event": UPDATE}, headers={"authorization": header}
    )
    assert_error(answer, 401, "invalid_write_key", "Invalid write key")


def test_a_disallowed_origin_is_403_and_an_allowed_one_gets_cors_headers(
    adapter: Any, known_user: Callable[[Any], str]
) -> None:
    profile_id = known_user(adapter)
    refused = adapter.event(ANN, UPDATE, headers={"origin": "https://evil.example"})
    assert_error(refused, 403, "origin_not_allowed", "Origin not allowed")
    (rejection,) = adapter.rejections()
    assert (rejection.reason, rejection.source_id) == ("origin_not_allowed", "shop")
    assert "firstname" not in adapter.profile(profile_id).traits

    allowed = adapter.event(ANN, UPDATE, headers={"origin": ORIGIN})
    assert allowed.json == created("email", profile_id=profile_id)
    assert allowed.headers["access-control-allow-origin"] == ORIGIN


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_a_wrong_method_is_405_as_json(adapter: Any, method: str) -> None:
    answer = adapter.send(
        "/v1/event", {"writeKey": KEY, "user": ANN, "event": UPDATE}, method=method
    )
    assert answer.status == 405
    assert answer.headers["content-type"] == "application/json"
    assert answer.json["code"] == "method_not_allowed"
    assert answer.headers["allow"] == "OPTIONS, POST"
    assert adapter.events() == []


def test_a_cors_preflight_is_answered_for_the_event_route(adapter: Any) -> None:
    answer = adapter.send(
        "/v1/event",
        method="OPTIONS",
        headers={"origin": ORIGIN, "access-control-request-method": "POST"},
    )
    assert answer.status == 204
    assert answer.headers["access-control-allow-methods"] == "OPTIONS, POST"


def test_a_body_that_is_not_json_by_content_type_is_415(adapter: Any) -> None:
    body = {"writeKey": KEY, "user": ANN, "event": UPDATE}
    answer = adapter.send("/v1/event", body, headers={"content-type": "application/xml"})
    assert_error(answer, 415, "unsupported_media_type", "Invalid request")
    assert [r.reason for r in adapter.rejections()] == ["unsupported_media_type"]


def test_text_plain_is_read_as_json(adapter: Any, known_user: Callable[[Any], str]) -> None:
    profile_id = known_user(adapter)
    body = {"writeKey": KEY, "user": ANN, "event": UPDATE}
    answer = adapter.send("/v1/event", body, headers={"content-type": "text/plain"})
    assert answer.json == created("email", profile_id=profile_id)


# -- 503 ----------------------------------------------------------------------------


def assert_unavailable(answer: Any) -> None:
    assert_error(answer, 503, "store_unavailable", "Service unavailable")
    assert answer.headers["retry-after"] == "5"


def test_a_closed_store_is_503_with_retry_after(
    adapter: Any, known_user: Callable[[Any], str]
) -> None:
    known_user(adapter)
    adapter.store.close()
    assert_unavailable(adapter.event(ANN, UPDATE))


@pytest.mark.parametrize("transport", ["flask", "starlette"])
def test_a_store_whose_commit_fails_is_503_with_retry_after(
    make_harness: Any, unavailable_store: Any, transport: str
) -> None:
    harness = make_harness(transport, store=unavailable_store)
    answer = harness.event(ANN, UPDATE)
    assert_unavailable(answer)
    (batch,) = unavailable_store.submitted
    assert [e.name for e in batch.events] == [None] and batch.rejections == []


@pytest.mark.parametrize("transport", ["flask", "starlette"])
def test_a_commit_that_times_out_is_503(make_harness: Any, transport: str) -> None:
    class Hanging(MemoryStore):
        # A Future, as Store.submit allows (it returns a Pending), though MemoryStore's
        # own submit is annotated to return a Commit.
        def submit(self, batch: Any) -> Future[Any]:  # type: ignore[override]
            return Future()  # never resolves

    harness = make_harness(transport, store=Hanging(), commit_timeout=0.05)
    assert_unavailable(harness.event(ANN, UPDATE))


# -- authentication ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "headers"),
    [
        ("writeKey", {}),
        ("write_key", {}),
        (None, {"authorization": basic(KEY)}),
        (None, {"authorization": basic(KEY, "ignored-password")}),
        ("writeKey", {"authorization": "Bearer something-else"}),
    ],
)
def test_the_write_key_is_accepted_in_every_place_and_never_stored(
    adapter: Any, known_user: Callable[[Any], str], field: str | None, headers: dict[str, str]
) -> None:
    profile_id = known_user(adapter)
    body: dict[str, Any] = {"user": ANN, "event": {"confirmation": {"orderId": "o-1"}}}
    if field is not None:
        body[field] = KEY
    answer = adapter.send("/v1/event", body, headers=headers)
    assert answer.json == created("email", profile_id=profile_id)
    (event,) = adapter.events(type="track")
    assert event.source_id == "shop"
    payload = json.loads(event.payload)
    assert not {"writeKey", "write_key"} & set(payload)
    assert KEY not in event.payload


def test_a_basic_auth_key_wins_over_the_body(
    make_harness: Any, known_user: Callable[[Any], str]
) -> None:
    harness = make_harness("flask", "sqlite")
    known_user(harness)
    answer = harness.send(
        "/v1/event",
        {"writeKey": KEY, "user": ANN, "event": UPDATE},
        headers={"authorization": basic("other-key")},
    )
    assert answer.status == 200
    assert [e.source_id for e in harness.events(type="identify")] == ["shop", "shop-b"]


def test_a_disabled_source_is_refused_like_an_unknown_key(make_harness: Any) -> None:
    harness = make_harness(
        "starlette", "sqlite", sources=[Source(write_key=KEY, id="shop", enabled=False)]
    )
    assert_error(harness.event(ANN, UPDATE), 401, "invalid_write_key", "Invalid write key")
