"""One example-based test per documented bad input of the HTTP Tracking API (seed 004).

Driven through ``Collector.route``/``handle`` with no adapter. Each test asserts the
exact status and the error body's fields (``Error``/``Message``/``Details``/``code``),
for the single-call and the batch endpoints, and what was stored or recorded.
"""

from __future__ import annotations

import base64
import gzip
import json
import subprocess
import sys
import tracemalloc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from fp_collect import Collector, Limits, Request, Response, Source
from fp_collect.dialects.segment import MESSAGE_TYPES
from fp_collect.errors import ConfigError, StoreUnavailable
from fp_collect.pipeline import MAX_RECORDED_PAYLOAD
from fp_collect.responses import PIXEL_GIF
from fp_collect.store import Batch, Outcome
from fp_collect.store.memory import MemoryStore

FIXED = 1_700_000_000.123
RECEIVED_ISO = "2023-11-14T22:13:20.123Z"
LIVE_KEY, OFF_KEY, UNKNOWN_KEY = "live-key", "off-key", "no-such-key"
LIVE_ID = "src-live"
PEER = "203.0.113.9"
MAX_CALL, MAX_BATCH = 15 * 1024, 500 * 1024

SINGLE_PATHS = [f"/v1/{t}" for t in MESSAGE_TYPES] + [f"/v1/{t[0]}" for t in MESSAGE_TYPES]
BATCH_PATHS = ["/v1/batch", "/v1/import", "/v1/b"]
WEBHOOK_PATHS = ["/v1/webhook", "/v1/w"]
POST_PATHS = SINGLE_PATHS + BATCH_PATHS + WEBHOOK_PATHS

INVALID_KEY = {
    "Error": "Bad Request",
    "Message": "Invalid or missing writekey",
    "Details": "",
    "code": "invalid_write_key",
    "message": "Invalid or missing writekey",
}
# On the batch endpoints, in the seed's batch shape.
INVALID_KEY_BATCH = {
    "Success": False,
    "Errors": [{"Error": "Bad Request", "Message": "Invalid or missing writekey", "Details": ""}],
    "code": "invalid_write_key",
    "message": "Invalid or missing writekey",
}
TOO_LARGE_BATCH_ERROR = {
    "Error": "Bad Request",
    "Message": "Error reading request body",
    "Details": "HTTP request too large",
}


def new_collector(**options: Any) -> Collector:
    return Collector(
        sources=[
            Source(write_key=LIVE_KEY, id=LIVE_ID),
            Source(write_key=OFF_KEY, id="src-off", enabled=False),
        ],
        storage=options.pop("storage", "memory://"),
        clock=lambda: FIXED,
        **options,
    )


@pytest.fixture
def collector() -> Collector:
    return new_collector()


def send(
    collector: Collector,
    path: str,
    body: object = b"",
    *,
    method: str = "POST",
    headers: Mapping[str, str] | None = None,
    query: str = "",
    client: str | None = PEER,
    body_too_large: bool = False,
) -> Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    route = collector.route(path)
    assert route is not None, path
    request = Request(method, path, query, dict(headers or {}), raw, client, body_too_large)
    return collector.handle(route, request)


def answer(response: Response) -> dict[str, Any]:
    assert dict(response.headers)["content-type"] == "application/json"
    parsed = json.loads(response.body)
    assert isinstance(parsed, dict)
    return parsed


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def single_error(status: str, message: str, details: str, code: str) -> dict[str, str]:
    return {
        "Error": status,
        "Message": message,
        "Details": details,
        "code": code,
        "message": message,
    }


def batch_error(status: str, message: str, details: str, code: str) -> dict[str, object]:
    summary = f"{message}: {details}" if details else message
    return {
        "Success": False,
        "Errors": [{"Error": status, "Message": message, "Details": details}],
        "code": code,
        "message": summary,
    }


def track(**fields: object) -> dict[str, object]:
    return {"type": "track", "event": "Clicked", "userId": "u-1", **fields}


def events(collector: Collector) -> list[dict[str, Any]]:
    return [json.loads(row.payload) for row in collector.store.events()]


def reasons(collector: Collector) -> list[str]:
    return [row.reason for row in collector.store.rejections()]


def padded(value: object, size: int) -> bytes:
    """``value`` as JSON, padded with trailing spaces to exactly ``size`` bytes."""
    raw = json.dumps(value).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


def sized_event(size: int, **fields: object) -> dict[str, object]:
    """A track event whose compact JSON is exactly ``size`` bytes."""
    event = track(properties={"pad": ""}, **fields)
    compact = len(json.dumps(event, separators=(",", ":")).encode())
    event["properties"] = {"pad": "x" * (size - compact)}
    assert len(json.dumps(event, separators=(",", ":")).encode()) == size
    return event


# -- invalid JSON, wrong shapes -----------------------------------------------------------


def test_invalid_json_single(collector: Collector) -> None:
    response = send(collector, "/v1/track", b'{"event": ')
    assert response.status == 400
    body = answer(response)
    details = body.pop("Details")
    assert isinstance(details, str) and details  # ujson's own words
    assert body == {
        "Error": "Bad Request",
        "Message": "Invalid JSON",
        "code": "invalid_json",
        "message": "Invalid JSON",
    }
    [rejection] = collector.store.rejections()
    assert (rejection.reason, rejection.payload, rejection.source_id) == (
        "invalid_json",
        '{"event": ',
        None,
    )
    assert list(collector.store.events()) == []


def test_invalid_json_batch(collector: Collector) -> None:
    response = send(collector, "/v1/batch", b'{"batch": [')
    assert response.status == 400
    body = answer(response)
    details = body["Errors"][0]["Details"]
    assert isinstance(details, str) and details
    assert body == batch_error("Bad Request", "Invalid JSON", details, "invalid_json")
    assert reasons(collector) == ["invalid_json"]


LONE_MINUS_TRACK = (
    b'{"writeKey":"live-key","type":"track","event":"E","userId":"u","properties":{"n":-}}'
)


@pytest.mark.parametrize(
    ("path", "body", "offset"),
    [
        ("/v1/track", LONE_MINUS_TRACK, LONE_MINUS_TRACK.index(b"-}")),
        ("/v1/webhook", b'{"n": -\n,"writeKey":"live-key"}', 6),
        ("/v1/batch", b'{"batch":[' + json.dumps(track()).encode() + b",-]}", None),
        ("/events/track", b'{"write_key":"live-key","event":"E","n":[1,-]}', None),
    ],
    ids=["track", "webhook", "batch", "firstparty"],
)
def test_a_minus_sign_without_digits_is_invalid_json(
    collector: Collector, path: str, body: bytes, offset: int | None
) -> None:
    """ujson reads ``-`` alone as 0: it is broken syntax, answered as any other is on
    that path (the Firstparty API's 200 with ``success: false`` included) and refused
    whole, since a strict parser cannot read the body at all."""
    headers = {"authorization": basic(LIVE_KEY)}
    broken = send(new_collector(), path, b'{"n":', headers=headers)
    response = send(collector, path, body, headers=headers)
    assert response.status == broken.status
    assert broken.status == (200 if path.startswith("/events/") else 400)
    body_answer = answer(response)
    assert body_answer["code"] == answer(broken)["code"] == "invalid_json"
    if offset is not None:
        assert body_answer["Details"] == f"a minus sign without digits at byte {offset}"
    assert list(collector.store.events()) == []
    assert [(r.reason, r.source_id) for r in collector.store.rejections()] == [
        ("invalid_json", LIVE_ID)
    ]


def test_minus_signs_inside_strings_and_numbers_are_kept(collector: Collector) -> None:
    """Only a minus outside every string with no digit after it is refused: titles such
    as "Shoes - Sale", a string that is a lone "-" and negative numbers are stored as sent."""
    properties = {"title": "Shoes - Sale", "dash": "-", "q": '\\" -', "n": [-1, -0.5e-3]}
    raw = json.dumps(track(properties=properties), separators=(",", ":")).encode()
    assert b'-"' in raw and b" - " in raw
    response = send(collector, "/v1/track", raw, headers={"authorization": basic(LIVE_KEY)})
    assert response.status == 200, answer(response)
    [stored] = events(collector)
    assert stored["properties"] == properties


def test_body_not_an_object_single(collector: Collector) -> None:
    response = send(collector, "/v1/identify", [{"userId": "u"}])
    assert response.status == 400
    assert answer(response) == single_error(
        "Bad Request", "the body must be a JSON object", "", "invalid_body"
    )
    assert reasons(collector) == ["invalid_body"]


def test_body_not_an_object_batch(collector: Collector) -> None:
    response = send(collector, "/v1/batch", [track()])
    assert response.status == 400
    assert answer(response) == batch_error(
        "Bad Request", "the body must be a JSON object", "", "invalid_body"
    )


@pytest.mark.parametrize("batch", [{"0": {}}, "events", None, 3], ids=repr)
def test_batch_not_an_array(collector: Collector, batch: object) -> None:
    response = send(collector, "/v1/batch", {"writeKey": LIVE_KEY, "batch": batch})
    assert response.status == 400
    assert answer(response) == batch_error(
        "Bad Request", "batch must be an array of events", "", "invalid_batch"
    )
    assert reasons(collector) == ["invalid_batch"]


def test_empty_batch(collector: Collector) -> None:
    response = send(collector, "/v1/import", {"writeKey": LIVE_KEY, "batch": []})
    assert response.status == 400
    assert answer(response) == batch_error("Bad Request", "batch is empty", "", "empty_batch")


# -- size limits ----------------------------------------------------------------------


def test_single_call_over_15_kib_is_413(collector: Collector) -> None:
    body = padded(track(writeKey=LIVE_KEY), MAX_CALL + 1)
    response = send(collector, "/v1/track", body)
    assert response.status == 413
    assert answer(response) == single_error(
        "Request Entity Too Large",
        "Request entity too large",
        "the limit is 15360 bytes",
        "payload_too_large",
    )
    assert list(collector.store.events()) == []
    assert reasons(collector) == ["payload_too_large"]


def test_single_call_of_exactly_15_kib_is_accepted(collector: Collector) -> None:
    response = send(collector, "/v1/track", padded(track(writeKey=LIVE_KEY), MAX_CALL))
    assert (response.status, answer(response)) == (200, {"success": True})


def test_body_cut_short_by_the_adapter_is_413(collector: Collector) -> None:
    response = send(collector, "/v1/page", b"", body_too_large=True)
    assert response.status == 413
    assert answer(response)["code"] == "payload_too_large"


def test_batch_over_500_kib_is_413(collector: Collector) -> None:
    body = padded({"writeKey": LIVE_KEY, "batch": [track()]}, MAX_BATCH + 1)
    response = send(collector, "/v1/batch", body)
    assert response.status == 413
    assert answer(response) == {
        "Success": False,
        "Errors": [TOO_LARGE_BATCH_ERROR],
        "code": "payload_too_large",
        "message": "Request entity too large: the limit is 512000 bytes",
    }
    assert list(collector.store.events()) == []


def test_batch_of_exactly_500_kib_is_accepted(collector: Collector) -> None:
    items = [sized_event(10_000, messageId=f"m-{i}") for i in range(50)]
    body = padded({"writeKey": LIVE_KEY, "batch": items}, MAX_BATCH)
    response = send(collector, "/v1/batch", body)
    assert (response.status, answer(response)) == (200, {"success": True})
    assert len(events(collector)) == 50


def test_one_event_over_15_kib_in_a_batch_is_refused_alone(collector: Collector) -> None:
    items = [
        track(messageId="before"),
        sized_event(MAX_CALL + 1, messageId="big"),
        sized_event(MAX_CALL, messageId="at-limit"),
        track(messageId="after"),
    ]
    response = send(collector, "/v1/batch", {"writeKey": LIVE_KEY, "batch": items})
    assert response.status == 207
    assert answer(response) == {
        "Success": False,
        "Errors": [
            {
                "Error": "Bad Request",
                "Message": "event larger than 15360 bytes",
                "Details": "event_too_large",
                "index": 1,
                "messageId": "big",
                "code": "event_too_large",
            }
        ],
        "code": "partial_success",
        "message": "1 of 4 events rejected",
    }
    assert [e["messageId"] for e in events(collector)] == ["before", "at-limit", "after"]
    [rejection] = collector.store.rejections()
    assert (rejection.reason, rejection.index, rejection.message_id) == (
        "event_too_large",
        1,
        "big",
    )


def test_a_batch_whose_every_event_is_over_15_kib_is_413(collector: Collector) -> None:
    """Seed 004: over the per-call limit is 413, also when a batch holds nothing else."""
    items = [sized_event(MAX_CALL + 1, messageId=f"big-{i}") for i in range(2)]
    response = send(collector, "/v1/batch", {"writeKey": LIVE_KEY, "batch": items})
    assert response.status == 413
    body = answer(response)
    assert (body["code"], body["message"]) == ("event_too_large", "2 of 2 events rejected")
    assert [(e["index"], e["code"]) for e in body["Errors"]] == [
        (0, "event_too_large"),
        (1, "event_too_large"),
    ]
    assert events(collector) == []
    assert sorted(str(r.message_id) for r in collector.store.rejections()) == ["big-0", "big-1"]


def test_a_batch_refused_whole_for_mixed_reasons_is_400(collector: Collector) -> None:
    items = [sized_event(MAX_CALL + 1, messageId="big"), track(messageId="bad", userId=None)]
    response = send(collector, "/v1/batch", {"writeKey": LIVE_KEY, "batch": items})
    assert (response.status, answer(response)["code"]) == (400, "invalid_batch")
    assert [e["code"] for e in answer(response)["Errors"]] == ["event_too_large", "missing_user_id"]


def test_the_event_limit_counts_the_batch_defaults_merged_in(collector: Collector) -> None:
    """The per-event limit holds for the event as stored: a batch-level context merged
    into every item counts, so that a small body cannot make every stored event large."""
    shared = {"pad": "c" * 10_000}
    items = [track(messageId="small"), sized_event(6_000, messageId="big")]
    body = {"writeKey": LIVE_KEY, "context": shared, "batch": items}
    response = send(collector, "/v1/batch", body)
    assert response.status == 207
    [error] = answer(response)["Errors"]
    assert (error["index"], error["code"]) == (1, "event_too_large")
    assert error["Message"] == "event larger than 15360 bytes with the batch's defaults merged in"
    [stored] = events(collector)
    assert (stored["messageId"], stored["context"]["pad"]) == ("small", shared["pad"])


def test_a_large_batch_context_cannot_be_copied_into_every_event(collector: Collector) -> None:
    """The audit's amplification: 250 tiny items and a 100 KB batch context were stored as
    250 events of 100 KB each. Each merged event is over the limit: 413, nothing stored."""
    items = [track(messageId=f"m-{i}") for i in range(250)]
    body = {"writeKey": LIVE_KEY, "context": {"pad": "c" * 100_000}, "batch": items}
    response = send(collector, "/v1/batch", body)
    assert (response.status, answer(response)["code"]) == (413, "event_too_large")
    assert events(collector) == []
    # Each refusal is recorded as sent: without the context copied into it.
    rejections = list(collector.store.rejections())
    assert len(rejections) == 250
    assert {json.loads(r.payload)["messageId"] for r in rejections} == {
        f"m-{i}" for i in range(250)
    }
    assert max(len(r.payload) for r in rejections) < 200


def test_an_item_refused_in_validation_is_recorded_as_sent(collector: Collector) -> None:
    """The batch's defaults go into what is stored, not into the record of a refusal: a
    small gzipped batch of invalid items cannot store its context once per item."""
    items = [{"type": "bogus", "userId": "u", "messageId": f"m-{i}"} for i in range(50)]
    body = {"writeKey": LIVE_KEY, "context": {"pad": "c" * 10_000}, "batch": items}
    response = send(collector, "/v1/batch", body)
    assert (response.status, answer(response)["code"]) == (400, "invalid_batch")
    rejections = list(collector.store.rejections())
    assert [json.loads(r.payload) for r in rejections] == items
    assert [r.reason for r in rejections] == ["invalid_type"] * 50


def test_a_refused_body_is_recorded_cut_to_a_bounded_size(collector: Collector) -> None:
    """No key needed to be recorded, so a record is bounded: 500 KiB of invalid UTF-8
    (gzipped to half a kilobyte) would be kept as 2 MB of escapes. Kept: its beginning and
    its size."""
    raw = b"\xff" * MAX_BATCH
    body = gzip.compress(raw)
    assert len(body) < 1_000
    response = send(collector, "/v1/batch", body, headers={"content-encoding": "gzip"})
    assert (response.status, answer(response)["code"]) == (400, "invalid_json")
    [rejection] = collector.store.rejections()
    assert rejection.source_id is None
    kept, note = rejection.payload[:MAX_RECORDED_PAYLOAD], rejection.payload[MAX_RECORDED_PAYLOAD:]
    assert kept == "\\xff" * (MAX_RECORDED_PAYLOAD // 4)
    assert note == f"... [cut at {MAX_RECORDED_PAYLOAD} characters; it had {MAX_BATCH} bytes]"


def test_a_refused_single_call_is_recorded_whole(collector: Collector) -> None:
    body = b"not json " + b"x" * (MAX_CALL - 9)
    assert len(body) == MAX_CALL
    assert send(collector, "/v1/track", body).status == 400
    [rejection] = collector.store.rejections()
    assert rejection.payload == body.decode()


def nested(depth: int) -> bytes:
    """A JSON object nested ``depth`` levels deep."""
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (str(2**64 + 1).encode(), "integers must fit in 64 bits"),
        (nested(64), "nesting deeper than 64 levels"),  # under the event: 65 levels
    ],
)
def test_an_unstorable_value_in_a_batch_refuses_its_event_alone(
    collector: Collector, value: bytes, problem: str
) -> None:
    """The README's promise: inside a batch, an event carrying an integer beyond 64 bits
    or nesting deeper than 64 levels is refused alone; its neighbours are stored."""
    bad = b'{"type":"track","event":"Clicked","userId":"u","messageId":"bad","properties":'
    body = (
        b'{"writeKey":"live-key","batch":['
        + json.dumps(track(messageId="before")).encode()
        + b","
        + bad
        + value
        + b"},"
        + json.dumps(track(messageId="after")).encode()
        + b"]}"
    )
    response = send(collector, "/v1/batch", body)
    assert response.status == 207
    [error] = answer(response)["Errors"]
    assert (error["index"], error["messageId"], error["code"]) == (1, "bad", "invalid_json")
    assert problem in error["Message"]
    assert [e["messageId"] for e in events(collector)] == ["before", "after"]
    [rejection] = collector.store.rejections()
    assert (rejection.reason, rejection.index, rejection.message_id) == ("invalid_json", 1, "bad")


def test_an_event_as_deep_as_the_limit_is_stored_in_a_batch_too(collector: Collector) -> None:
    """Depth is the event's own, not the batch body's: what a single call may nest, an
    event inside a batch may too."""
    event = b'{"type":"track","event":"Clicked","userId":"u","messageId":"%s","properties":'
    deepest = nested(63)  # 64 levels with the event itself
    auth = {"authorization": basic(LIVE_KEY)}
    single = send(collector, "/v1/track", event % b"single" + deepest + b"}", headers=auth)
    assert single.status == 200
    batch = b'{"writeKey":"live-key","batch":[' + event % b"in-batch" + deepest + b"}]}"
    assert send(collector, "/v1/batch", batch).status == 200
    assert [e["messageId"] for e in events(collector)] == ["single", "in-batch"]


def test_an_unstorable_value_outside_the_events_refuses_the_batch(collector: Collector) -> None:
    body = b'{"writeKey":"live-key","context":{"n":18446744073709551617},"batch":[{}]}'
    response = send(collector, "/v1/batch", body)
    assert response.status == 400
    assert answer(response)["code"] == "invalid_json"
    assert reasons(collector) == ["invalid_json"]


def test_an_unstorable_event_reports_the_id_its_client_sent(collector: Collector) -> None:
    """None when it sent none, never the one the collector would have generated."""
    body = b'{"writeKey":"live-key","batch":[{"type":"track","event":"C","userId":"u","x":NaN}]}'
    response = send(collector, "/v1/batch", body)
    assert response.status == 400
    [error] = answer(response)["Errors"]
    assert (error["code"], error["messageId"]) == ("invalid_json", None)
    [rejection] = collector.store.rejections()
    assert rejection.message_id is None


def test_413_after_gzip_decompression_single(collector: Collector) -> None:
    body = gzip.compress(padded(track(writeKey=LIVE_KEY), MAX_CALL + 1))
    assert len(body) < MAX_CALL
    response = send(collector, "/v1/track", body, headers={"content-encoding": "gzip"})
    assert response.status == 413
    assert answer(response) == single_error(
        "Request Entity Too Large",
        "Request entity too large",
        "the limit is 15360 bytes after decompression",
        "payload_too_large",
    )


def test_gzip_bomb_is_413_without_inflating_it(collector: Collector) -> None:
    bomb = gzip.compress(b" " * 10_000_000)
    tracemalloc.start()
    try:
        response = send(collector, "/v1/batch", bomb, headers={"content-encoding": "gzip"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status == 413
    assert answer(response) == {
        "Success": False,
        "Errors": [TOO_LARGE_BATCH_ERROR],
        "code": "payload_too_large",
        "message": "Request entity too large: the limit is 512000 bytes after decompression",
    }
    # The limit is 500 KiB; 10 MB must never be held.
    assert peak < 4_000_000


def test_gzip_body_within_the_limit_is_accepted(collector: Collector) -> None:
    body = gzip.compress(json.dumps(track(writeKey=LIVE_KEY)).encode())
    response = send(collector, "/v1/t", body, headers={"content-encoding": "gzip"})
    assert (response.status, answer(response)) == (200, {"success": True})


# -- media types and encodings --------------------------------------------------------


def test_415_for_application_xml(collector: Collector) -> None:
    headers = {"content-type": "application/xml"}
    response = send(collector, "/v1/track", track(writeKey=LIVE_KEY), headers=headers)
    assert response.status == 415
    expected = ("Content-Type must be application/json or text/plain", "got 'application/xml'")
    assert answer(response) == single_error(
        "Unsupported Media Type", *expected, "unsupported_media_type"
    )
    response = send(collector, "/v1/batch", {"writeKey": LIVE_KEY, "batch": []}, headers=headers)
    assert response.status == 415
    assert answer(response) == batch_error(
        "Unsupported Media Type", *expected, "unsupported_media_type"
    )


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_content_type_is_read_as_none(collector: Collector, value: str) -> None:
    """WSGI servers cannot tell an empty Content-Type from none, so ASGI must not either:
    both adapters give the same answer."""
    headers = {"content-type": value}
    response = send(collector, "/v1/track", track(writeKey=LIVE_KEY), headers=headers)
    assert (response.status, answer(response)) == (200, {"success": True})


def test_415_for_brotli(collector: Collector) -> None:
    headers = {"content-encoding": "br"}
    response = send(collector, "/v1/track", b"\x0b\x02\x80{}\x03", headers=headers)
    assert response.status == 415
    expected = ("Content-Encoding must be gzip or absent", "got 'br'")
    assert answer(response) == single_error(
        "Unsupported Media Type", *expected, "unsupported_content_encoding"
    )
    response = send(collector, "/v1/b", b"\x0b\x02\x80{}\x03", headers=headers)
    assert response.status == 415
    assert answer(response) == batch_error(
        "Unsupported Media Type", *expected, "unsupported_content_encoding"
    )


def test_invalid_gzip_is_400(collector: Collector) -> None:
    response = send(
        collector, "/v1/track", b"not gzip at all", headers={"content-encoding": "gzip"}
    )
    assert response.status == 400
    body = answer(response)
    assert body.pop("Details")  # zlib's words
    assert body == {
        "Error": "Bad Request",
        "Message": "the body is not valid gzip",
        "code": "invalid_gzip",
        "message": "the body is not valid gzip",
    }


def test_truncated_gzip_is_400(collector: Collector) -> None:
    whole = gzip.compress(json.dumps(track(writeKey=LIVE_KEY)).encode())
    response = send(collector, "/v1/track", whole[:-10], headers={"content-encoding": "gzip"})
    assert response.status == 400
    assert answer(response) == single_error(
        "Bad Request", "the gzip body is truncated", "", "invalid_gzip"
    )
    response = send(collector, "/v1/batch", whole[:-10], headers={"content-encoding": "gzip"})
    assert response.status == 400
    assert answer(response) == batch_error(
        "Bad Request", "the gzip body is truncated", "", "invalid_gzip"
    )


def test_garbage_after_the_gzip_stream_is_not_silently_dropped(collector: Collector) -> None:
    whole = gzip.compress(json.dumps(track(writeKey=LIVE_KEY)).encode())
    response = send(
        collector, "/v1/track", whole + b"garbage", headers={"content-encoding": "gzip"}
    )
    assert response.status == 400
    assert answer(response)["code"] in ("invalid_gzip", "invalid_json")
    assert list(collector.store.events()) == []


def test_multi_member_gzip_is_read_in_full(collector: Collector) -> None:
    text = json.dumps(track(writeKey=LIVE_KEY, messageId="two-members")).encode()
    body = gzip.compress(text[:20]) + gzip.compress(text[20:])
    response = send(collector, "/v1/track", body, headers={"content-encoding": "gzip"})
    assert (response.status, answer(response)) == (200, {"success": True})
    assert [e["messageId"] for e in events(collector)] == ["two-members"]


# -- write keys -------------------------------------------------------------------------


@pytest.mark.parametrize("path", POST_PATHS)
def test_missing_unknown_and_disabled_keys_get_one_identical_answer(path: str) -> None:
    message = track()
    payload: dict[str, object] = {"batch": [message]} if path in BATCH_PATHS else message
    answers = set()
    cases: list[tuple[dict[str, object], dict[str, str], str]] = [({}, {}, "")]
    for key in (UNKNOWN_KEY, OFF_KEY):
        cases.append(({"writeKey": key}, {}, ""))
        cases.append(({}, {"authorization": basic(key)}, ""))
        if path in WEBHOOK_PATHS:
            cases.append(({}, {}, f"writeKey={key}"))
    for in_body, headers, query in cases:
        collector = new_collector()
        response = send(collector, path, {**payload, **in_body}, headers=headers, query=query)
        answers.add((response.status, tuple(response.headers), response.body))
    assert len(answers) == 1
    [(status, _, body)] = answers
    assert status == 400
    assert json.loads(body) == (INVALID_KEY_BATCH if path in BATCH_PATHS else INVALID_KEY)


class DownStore(MemoryStore):
    """A store that cannot commit anything."""

    def commit(self, batch: Batch, timeout: float | None = None) -> list[Outcome]:
        raise StoreUnavailable("the disk is gone")


@pytest.mark.parametrize(
    ("path", "body", "shape"),
    [
        ("/v1/track", track(), "single"),
        ("/v1/webhook", track(), "single"),
        ("/v1/batch", {"batch": [track()]}, "batch"),
        ("/v1/b", {"batch": [track(), 7]}, "batch"),  # partly refused: its 207 never comes
        ("/v1/webhook", {"batch": [track()]}, "batch"),
    ],
)
def test_503_comes_in_the_shape_of_the_endpoints_errors(
    path: str, body: dict[str, object], shape: str
) -> None:
    collector = Collector(sources=[Source(write_key=LIVE_KEY, id=LIVE_ID)], store=DownStore())
    response = send(collector, path, body, headers={"authorization": basic(LIVE_KEY)})
    assert response.status == 503
    assert ("retry-after", "5") in response.headers
    error = {
        "Error": "Service Unavailable",
        "Message": "The event store is unavailable, retry later",
        "Details": "",
    }
    summary = {"code": "store_unavailable", "message": error["Message"]}
    if shape == "batch":
        assert answer(response) == {"Success": False, "Errors": [error], **summary}
    else:
        assert answer(response) == {**error, **summary}


@pytest.mark.parametrize("path", ["/v1/m", "/v1/m/"])
def test_analytics_js_telemetry_is_answered_and_not_kept(collector: Collector, path: str) -> None:
    """analytics-next posts ``{"series": [...]}`` (text/plain, no key) to ``{apiHost}/m``
    every 30 s: answered 200 so it never reaches the host app, and nothing is stored."""
    series = {"series": [{"type": "Counter", "metric": "analytics_js.invoke", "value": 1,
                          "tags": {"library": "analytics.js"}}]}  # fmt: skip
    response = send(collector, path, series, headers={"content-type": "text/plain"})
    assert (response.status, answer(response)) == (200, {"success": True})
    assert collector.route("/v1/m") is not None
    assert list(collector.store.events()) == [] and list(collector.store.rejections()) == []
    assert send(collector, path, method="GET").status == 405


def test_a_webhook_batch_without_a_valid_key_is_answered_in_the_batch_shape(
    collector: Collector,
) -> None:
    for query in ("", f"writeKey={UNKNOWN_KEY}"):
        response = send(collector, "/v1/webhook", {"batch": [track()]}, query=query)
        assert (response.status, answer(response)) == (400, INVALID_KEY_BATCH)


@pytest.mark.parametrize("key", [123, None, [], {}, True, ""], ids=repr)
def test_a_non_string_body_key_is_just_an_invalid_key(collector: Collector, key: object) -> None:
    response = send(collector, "/v1/track", track(writeKey=key))
    assert (response.status, answer(response)) == (400, INVALID_KEY)


def test_bad_keys_are_recorded_without_a_source(collector: Collector) -> None:
    send(collector, "/v1/track", track(writeKey=OFF_KEY))
    [rejection] = collector.store.rejections()
    assert (rejection.reason, rejection.source_id) == ("invalid_write_key", None)


# -- validation, per type --------------------------------------------------------------

REQUIRED = {"track": {"event": "e"}, "group": {"groupId": "g"}, "alias": {"previousId": "p"}}
NO_USER = "userId or anonymousId is required"
VALIDATION_CASES = [
    *((t, REQUIRED.get(t, {}), "missing_user_id", NO_USER) for t in MESSAGE_TYPES),
    ("identify", {"userId": "", "anonymousId": ""}, "missing_user_id", NO_USER),
    ("page", {"userId": None, "anonymousId": None}, "missing_user_id", NO_USER),
    ("track", {"userId": "u"}, "missing_event", "event is required for track"),
    ("track", {"userId": "u", "event": ""}, "missing_event", "event is required for track"),
    ("group", {"userId": "u"}, "missing_group_id", "groupId is required for group"),
    ("alias", {"userId": "u"}, "missing_previous_id", "previousId is required for alias"),
    ("page", {"userId": "u", "properties": []}, "invalid_field", "properties must be an object"),
    ("identify", {"userId": "u", "traits": "x"}, "invalid_field", "traits must be an object"),
    ("track", {"userId": 7, "event": "e"}, "invalid_field", "userId must be a string"),
    (
        "screen",
        {"userId": "u", "timestamp": "last tuesday"},
        "invalid_timestamp",
        "timestamp must be an ISO-8601 date string",
    ),
    (
        "page",
        {"userId": "u", "timestamp": "2020-02-30T00:00:00Z"},
        "invalid_timestamp",
        "timestamp must be an ISO-8601 date string",
    ),
    (
        "page",
        {"userId": "u", "sentAt": 1700000000},
        "invalid_timestamp",
        "sentAt must be an ISO-8601 date string",
    ),
]


@pytest.mark.parametrize(("kind", "fields", "code", "message"), VALIDATION_CASES)
def test_validation_error_single(
    collector: Collector, kind: str, fields: dict[str, object], code: str, message: str
) -> None:
    response = send(collector, f"/v1/{kind}", {"writeKey": LIVE_KEY, **fields})
    assert response.status == 400
    assert answer(response) == single_error("Bad Request", message, "", code)
    [rejection] = collector.store.rejections()
    assert (rejection.reason, rejection.source_id) == (code, LIVE_ID)
    assert list(collector.store.events()) == []


@pytest.mark.parametrize(("kind", "fields", "code", "message"), VALIDATION_CASES)
def test_validation_error_batch(
    collector: Collector, kind: str, fields: dict[str, object], code: str, message: str
) -> None:
    item = {"type": kind, "messageId": "bad-1", **fields}
    response = send(collector, "/v1/batch", {"writeKey": LIVE_KEY, "batch": [item]})
    assert response.status == 400
    assert answer(response) == {
        "Success": False,
        "Errors": [
            {
                "Error": "Bad Request",
                "Message": message,
                "Details": code,
                "index": 0,
                "messageId": "bad-1",
                "code": code,
            }
        ],
        "code": "invalid_batch",
        "message": "1 of 1 events rejected",
    }
    [rejection] = collector.store.rejections()
    assert (rejection.reason, rejection.index, rejection.message_id, rejection.source_id) == (
        code,
        0,
        "bad-1",
        LIVE_ID,
    )


@pytest.mark.parametrize("bad_type", [[], {}, ["track"], {"track": 1}], ids=repr)
def test_a_batch_item_with_a_non_string_type_is_refused_alone(
    collector: Collector, bad_type: object
) -> None:
    """Bug: normalise_message tests ``type in frozenset`` before checking it is a string;
    a list or object raises TypeError and the whole batch becomes internal_error."""
    items = [{"type": bad_type, "userId": "u", "messageId": "bad"}, track(messageId="good")]
    response = send(collector, "/v1/batch", {"writeKey": LIVE_KEY, "batch": items})
    assert response.status == 207
    errors = answer(response)["Errors"]
    assert [(e["index"], e["code"]) for e in errors] == [(0, "invalid_type")]
    assert [e["messageId"] for e in events(collector)] == ["good"]


def test_a_webhook_message_with_a_non_string_type_is_400(collector: Collector) -> None:
    response = send(collector, "/v1/webhook", {"writeKey": LIVE_KEY, "type": [], "userId": "u"})
    assert response.status == 400
    assert answer(response)["code"] == "invalid_type"


@pytest.mark.parametrize(
    "timestamp", ["0001-01-01T00:00:00+01:00", "0001-01-01T00:59:59.999+01:00"]
)
def test_a_timestamp_before_year_one_does_not_take_the_batch_down(
    collector: Collector, timestamp: str
) -> None:
    items = [track(messageId="old", timestamp=timestamp), track(messageId="fine")]
    response = send(collector, "/v1/batch", {"writeKey": LIVE_KEY, "batch": items})
    assert response.status in (200, 207)
    assert answer(response).get("code") != "internal_error"
    assert "fine" in [e["messageId"] for e in events(collector)]


# -- methods -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/track", "OPTIONS, POST"),
        ("PUT", "/v1/batch", "OPTIONS, POST"),
        ("DELETE", "/v1/webhook", "OPTIONS, POST"),
        ("POST", "/v1/pixel/track", "GET, OPTIONS"),
    ],
)
def test_405_names_the_allowed_methods(
    collector: Collector, method: str, path: str, allow: str
) -> None:
    response = send(collector, path, method=method)
    assert response.status == 405
    assert dict(response.headers)["allow"] == allow
    message = f"{method} is not allowed here; use {allow}"
    assert answer(response) == single_error("Method Not Allowed", message, "", "method_not_allowed")
    assert list(collector.store.rejections()) == []


# -- the tracking pixel ----------------------------------------------------------------


def pixel_query(value: object, **extra: str) -> str:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    params = {"data": base64.b64encode(raw).decode(), **extra}
    return "&".join(f"{k}={v}" for k, v in params.items())


def assert_pixel(response: Response) -> None:
    assert response.status == 200
    assert response.body == PIXEL_GIF
    headers = dict(response.headers)
    assert headers["content-type"] == "image/gif"
    assert {"no-cache", "no-store"} <= {
        part.strip() for part in headers["cache-control"].split(",")
    }
    assert headers["pragma"] == "no-cache"
    assert headers["expires"] == "0"


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("", "invalid_json"),
        ("data=", "invalid_json"),
        ("data=!!!not-base64!!!", "invalid_pixel_data"),
        (pixel_query(b"not json"), "invalid_json"),
        (pixel_query([1, 2]), "invalid_body"),
        (pixel_query(track(writeKey=UNKNOWN_KEY)), "invalid_write_key"),
        (pixel_query(track(writeKey=OFF_KEY)), "invalid_write_key"),
        (pixel_query({"writeKey": LIVE_KEY, "event": "e"}), "missing_user_id"),
        (pixel_query(track(writeKey=LIVE_KEY, timestamp="soon")), "invalid_timestamp"),
        (pixel_query(b'{"writeKey":"live-key","event":"e","userId":NaN}'), "invalid_field"),
        (pixel_query(b'{"writeKey":"live-key","event":"e","userId":"u","x":NaN}'), "invalid_json"),
    ],
)
def test_pixel_is_always_a_gif_and_bad_data_is_recorded(
    collector: Collector, query: str, reason: str
) -> None:
    response = send(collector, "/v1/pixel/track", method="GET", query=query)
    assert_pixel(response)
    assert list(collector.store.events()) == []
    [rejection] = collector.store.rejections()
    assert rejection.reason == reason
    assert rejection.endpoint == "/v1/pixel/track"


def test_pixel_stores_good_data(collector: Collector) -> None:
    query = pixel_query({"event": "Opened", "userId": "u"}, writeKey=LIVE_KEY)
    response = send(collector, "/v1/pixel/track", method="GET", query=query)
    assert_pixel(response)
    [event] = events(collector)
    assert (event["type"], event["event"], event["userId"]) == ("track", "Opened", "u")


def test_pixel_is_a_gif_even_for_a_timestamp_before_year_one(collector: Collector) -> None:
    query = pixel_query(track(writeKey=LIVE_KEY, timestamp="0001-01-01T00:00:00+01:00"))
    assert_pixel(send(collector, "/v1/pixel/page", method="GET", query=query))


# -- webhook ---------------------------------------------------------------------------


def test_webhook_query_key_overrides_the_payload_key(collector: Collector) -> None:
    query = f"writeKey={LIVE_KEY}"
    response = send(collector, "/v1/webhook", track(writeKey=UNKNOWN_KEY), query=query)
    assert (response.status, answer(response)) == (200, {"success": True})
    [row] = collector.store.events()
    assert row.source_id == LIVE_ID
    assert "writeKey" not in json.loads(row.payload)

    response = send(collector, "/v1/w", track(writeKey=LIVE_KEY), query=f"writeKey={OFF_KEY}")
    assert (response.status, answer(response)) == (400, INVALID_KEY)


def test_webhook_query_key_overrides_the_payload_key_for_a_batch(collector: Collector) -> None:
    body = {"writeKey": UNKNOWN_KEY, "batch": [track(messageId="w-1", writeKey=UNKNOWN_KEY)]}
    response = send(collector, "/v1/webhook", body, query=f"writeKey={LIVE_KEY}")
    assert (response.status, answer(response)) == (200, {"success": True})
    assert [(row.source_id, row.message_id) for row in collector.store.events()] == [
        (LIVE_ID, "w-1")
    ]


def test_webhook_empty_query_key_means_no_key_for_a_batch_too(collector: Collector) -> None:
    """An empty ``?writeKey=`` falls back to the payload key for one message; a batch
    should not be refused for the same query string."""
    single = send(collector, "/v1/webhook", track(writeKey=LIVE_KEY), query="writeKey=")
    assert single.status == 200
    body = {"writeKey": LIVE_KEY, "batch": [track(messageId="b-1")]}
    batch = send(collector, "/v1/webhook", body, query="writeKey=")
    assert (batch.status, answer(batch)) == (200, {"success": True})


def test_the_seeds_event_name_field_is_taken_as_event(collector: Collector) -> None:
    """Seed 004's track table: "eventName | required | String"; its examples send event."""
    body = {
        "type": "track",
        "userId": "1234qwerty",
        "eventName": "Added File",
        "writeKey": LIVE_KEY,
    }
    assert send(collector, "/v1/track", body).status == 200
    [stored] = events(collector)
    assert stored["event"] == "Added File" and "eventName" not in stored
    assert [e.name for e in collector.store.events()] == ["Added File"]
    refused = send(collector, "/v1/track", {**body, "eventName": ""})
    assert (refused.status, answer(refused)["code"]) == (400, "missing_event")


# -- who a refusal is recorded under --------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        ("/v1/track", b"{", "invalid_json"),
        ("/v1/batch", b"{", "invalid_json"),
        ("/v1/batch", b'{"batch": []}', "empty_batch"),
        ("/v1/track", b"[]", "invalid_body"),
    ],
)
@pytest.mark.parametrize("record_unauthenticated", [True, False])
def test_a_refusal_with_a_valid_basic_key_is_that_sources(
    path: str, body: bytes, reason: str, record_unauthenticated: bool
) -> None:
    """Refused before the body named a source, a request is still its Basic credential's
    source's: found under it, and kept even when unauthenticated refusals are not."""
    collector = new_collector(record_unauthenticated=record_unauthenticated)
    response = send(collector, path, body, headers={"authorization": basic(LIVE_KEY)})
    assert response.status == 400
    assert [(r.reason, r.source_id) for r in collector.store.rejections()] == [(reason, LIVE_ID)]


BIG = b"18446744073709551617"  # beyond 64 bits: refused before the body's key is read


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        (
            "/v1/track",
            b'{"writeKey":"live-key","userId":"u","event":"E","n":' + BIG + b"}",
            "invalid_json",
        ),
        (
            "/v1/batch",
            b'{"batch":'
            + b"["
            + b",".join([b'{"writeKey":"live-key","type":"track","userId":"u","event":"E"}'] * 2501)
            + b"]}",
            "payload_too_large",
        ),
        ("/events/track", b'{"write_key":"live-key","event":"E","n":' + BIG + b"}", "invalid_json"),
        ("/events/track/bulk", b'{"write_key":"live-key","events":"nope"}', "invalid_batch"),
    ],
    ids=["track-huge-int", "batch-keys-per-event-too-long", "firstparty-huge-int", "bulk-shape"],
)
def test_a_refusal_whose_body_names_a_valid_key_is_that_sources(
    path: str, body: bytes, reason: str
) -> None:
    collector = new_collector(record_unauthenticated=False)
    send(collector, path, body, headers={"content-type": "application/json"})
    assert [(r.reason, r.source_id) for r in collector.store.rejections()] == [(reason, LIVE_ID)]


def test_a_batch_refused_for_its_shape_is_its_body_keys_sources(collector: Collector) -> None:
    response = send(collector, "/v1/batch", {"writeKey": LIVE_KEY, "batch": []})
    assert response.status == 400
    assert [(r.reason, r.source_id) for r in collector.store.rejections()] == [
        ("empty_batch", LIVE_ID)
    ]


@pytest.mark.parametrize(
    "headers", [{}, {"authorization": basic(UNKNOWN_KEY)}, {"authorization": basic(OFF_KEY)}]
)
def test_without_a_valid_key_a_refusal_is_kept_only_if_configured(
    headers: dict[str, str],
) -> None:
    for record, expected in ((True, [("invalid_json", None)]), (False, [])):
        collector = new_collector(record_unauthenticated=record)
        assert send(collector, "/v1/track", b"{", headers=headers).status == 400
        assert [(r.reason, r.source_id) for r in collector.store.rejections()] == expected


@pytest.mark.parametrize("status", [207, 200])
def test_a_partial_batch_is_answered_with_its_sources_status(status: int) -> None:
    """rudder-sdk-python takes only 200 as success: its source may ask for 200, with the
    same body naming the refused events."""
    collector = Collector(
        sources=[Source(write_key=LIVE_KEY, id=LIVE_ID, partial_success_status=status)],
        storage="memory://",
    )
    items = [track(messageId="good"), track(messageId="bad", userId=None)]
    response = send(
        collector, "/v1/batch", {"batch": items}, headers={"authorization": basic(LIVE_KEY)}
    )
    assert response.status == status
    assert answer(response)["code"] == "partial_success"
    assert [(e["index"], e["code"]) for e in answer(response)["Errors"]] == [(1, "missing_user_id")]
    assert [e["messageId"] for e in events(collector)] == ["good"]
    # A batch refused whole stays a 400 either way.
    refused = send(
        collector, "/v1/batch", {"batch": items[1:]}, headers={"authorization": basic(LIVE_KEY)}
    )
    assert refused.status == 400


@pytest.mark.parametrize("value", [204, 400, True, "200"])
def test_partial_success_status_is_207_or_200(value: Any) -> None:
    with pytest.raises(ConfigError, match="partial_success_status"):
        Source(write_key=LIVE_KEY, partial_success_status=value)


def test_an_event_refused_in_a_batch_keyed_per_event_is_its_keys_sources() -> None:
    """Refused before it is read (too big a number here), an event carrying a valid key
    is still recorded under that source, even when unauthenticated refusals are not."""
    collector = new_collector(record_unauthenticated=False)
    good = json.dumps(track(writeKey=LIVE_KEY, messageId="good")).encode()
    bad = (
        b'{"type":"track","event":"C","userId":"u","writeKey":"live-key","n":18446744073709551617}'
    )
    response = send(collector, "/v1/batch", b'{"batch":[' + good + b"," + bad + b"]}")
    assert response.status == 207
    assert [(r.reason, r.index, r.source_id) for r in collector.store.rejections()] == [
        ("invalid_json", 1, LIVE_ID)
    ]


def test_a_duplicate_inside_a_batch_is_recorded_with_its_index(collector: Collector) -> None:
    items = [track(messageId="a"), track(messageId="b"), track(messageId="a")]
    assert send(collector, "/v1/batch", {"writeKey": LIVE_KEY, "batch": items}).status == 200
    assert [(r.reason, r.index) for r in collector.store.rejections()] == [
        ("duplicate_message_id", 2)
    ]


# -- what one small request can cost -----------------------------------------------------


def gzipped_batch(items: bytes, count: int, **fields: str) -> bytes:
    head = json.dumps(fields)[:-1] + (", " if fields else "") + '"batch": ['
    return gzip.compress(head.encode() + b",".join([items] * count) + b"]}")


def test_a_batch_of_more_events_than_the_limit_is_413_and_one_record(collector: Collector) -> None:
    """A few hundred bytes of gzip can hold 250,000 tiny items: refused before any is
    read, with one record and a small answer."""
    body = gzipped_batch(b"0", 250_000, writeKey=LIVE_KEY)
    assert len(body) < 1000
    response = send(collector, "/v1/batch", body, headers={"content-encoding": "gzip"})
    assert response.status == 413
    assert answer(response)["Errors"] == [TOO_LARGE_BATCH_ERROR]
    assert "at most 2500 events per batch" in answer(response)["message"]
    assert len(response.body) < 1000
    assert reasons(collector) == ["payload_too_large"]


def test_the_event_limit_is_configurable_and_inclusive() -> None:
    collector = new_collector(limits=Limits(max_batch_events=3))
    items = [track(messageId=f"m-{i}") for i in range(4)]
    assert send(collector, "/v1/batch", {"writeKey": LIVE_KEY, "batch": items[:3]}).status == 200
    assert send(collector, "/v1/batch", {"writeKey": LIVE_KEY, "batch": items}).status == 413


def test_a_batch_with_no_valid_key_anywhere_is_refused_once(collector: Collector) -> None:
    items = [track(writeKey=UNKNOWN_KEY, messageId=f"m-{i}") for i in range(50)] + [0, "x"]
    response = send(collector, "/v1/batch", {"batch": items})
    assert (response.status, answer(response)) == (400, INVALID_KEY_BATCH)
    assert [(r.reason, r.index) for r in collector.store.rejections()] == [
        ("invalid_write_key", None)
    ]


@pytest.mark.parametrize("record_unauthenticated", [True, False])
def test_items_with_bad_keys_are_recorded_only_if_configured(record_unauthenticated: bool) -> None:
    collector = new_collector(record_unauthenticated=record_unauthenticated)
    items = [track(writeKey=LIVE_KEY, messageId="good"), track(writeKey=UNKNOWN_KEY), 7]
    response = send(collector, "/v1/batch", {"batch": items})
    assert response.status == 207
    codes = ["invalid_write_key", "invalid_event"]  # neither names a valid key
    assert [e["code"] for e in answer(response)["Errors"]] == codes
    assert [e["messageId"] for e in events(collector)] == ["good"]
    expected = [("invalid_write_key", 1), ("invalid_event", 2)]
    assert [(r.reason, r.index) for r in collector.store.rejections()] == (
        expected if record_unauthenticated else []
    )


# -- enrichment ------------------------------------------------------------------------


def test_batch_context_and_integrations_merge_with_the_items_own_winning(
    collector: Collector,
) -> None:
    body = {
        "writeKey": LIVE_KEY,
        "context": {"page": {"path": "/cart"}, "locale": "en-US", "userAgent": "batch-ua"},
        "integrations": {"All": False, "Mixpanel": True},
        "batch": [
            track(messageId="plain"),
            track(
                messageId="own",
                context={"locale": "fr-FR", "ip": "198.51.100.4"},
                integrations={"Mixpanel": False, "Amplitude": True},
            ),
        ],
    }
    response = send(collector, "/v1/batch", body, headers={"user-agent": "header-ua"})
    assert response.status == 200
    plain, own = events(collector)
    assert plain["context"] == {
        "page": {"path": "/cart"},
        "locale": "en-US",
        "userAgent": "batch-ua",
        "ip": PEER,
    }
    assert plain["integrations"] == {"All": False, "Mixpanel": True}
    assert own["context"] == {
        "page": {"path": "/cart"},
        "locale": "fr-FR",
        "userAgent": "batch-ua",
        "ip": "198.51.100.4",
    }
    assert own["integrations"] == {"All": False, "Mixpanel": False, "Amplitude": True}


def test_a_batch_level_timestamp_is_the_time_of_items_without_one(collector: Collector) -> None:
    """The seed: batches "allow for context and timestamps to be injected from the top
    level". Skew correction then applies to it as to an item's own."""
    body = {
        "writeKey": LIVE_KEY,
        "timestamp": "2023-11-14T22:13:00.123Z",
        "sentAt": "2023-11-14T22:13:30.123Z",  # 30 s after the events; received at FIXED
        "batch": [
            track(messageId="plain"),
            track(messageId="own", timestamp="2023-11-14T22:12:00.123Z"),
            track(messageId="null", timestamp=None),
        ],
    }
    assert send(collector, "/v1/import", body).status == 200
    stored = {e["messageId"]: e for e in events(collector)}
    assert stored["plain"]["originalTimestamp"] == "2023-11-14T22:13:00.123Z"
    assert stored["plain"]["timestamp"] == "2023-11-14T22:12:50.123Z"
    assert stored["null"]["timestamp"] == "2023-11-14T22:12:50.123Z"
    assert stored["own"]["originalTimestamp"] == "2023-11-14T22:12:00.123Z"
    assert stored["own"]["timestamp"] == "2023-11-14T22:11:50.123Z"


@pytest.mark.parametrize("timestamp", ["yesterday", 1700000000, {}])
def test_a_bad_batch_level_timestamp_refuses_only_the_events_that_take_it(
    collector: Collector, timestamp: object
) -> None:
    """As an event's own bad timestamp would: the events with a time of their own stay."""
    items = [track(messageId="inherits"), track(messageId="own", timestamp="2023-11-14T22:00:00Z")]
    body = {"writeKey": LIVE_KEY, "timestamp": timestamp, "batch": items}
    response = send(collector, "/v1/batch", body)
    assert response.status == 207
    assert [(e["index"], e["code"]) for e in answer(response)["Errors"]] == [
        (0, "invalid_timestamp")
    ]
    assert [e["messageId"] for e in events(collector)] == ["own"]
    assert reasons(collector) == ["invalid_timestamp"]


@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded", "expected"),
    [
        (("10.0.0.0/8",), "10.1.2.3", "198.51.100.7", "198.51.100.7"),
        (("10.0.0.0/8",), "10.1.2.3", "198.51.100.7, 10.9.9.9", "198.51.100.7"),
        (("10.0.0.0/8",), "10.1.2.3", "192.0.2.1, 198.51.100.7", "198.51.100.7"),
        (("10.0.0.0/8",), PEER, "198.51.100.7", PEER),
        ((), "10.1.2.3", "198.51.100.7", "10.1.2.3"),
        (("10.0.0.0/8",), "10.1.2.3", "not-an-address", "10.1.2.3"),
    ],
)
def test_x_forwarded_for_is_believed_only_from_trusted_proxies(
    trusted: tuple[str, ...], peer: str, forwarded: str, expected: str
) -> None:
    collector = new_collector(trusted_proxies=trusted)
    headers = {"x-forwarded-for": forwarded}
    response = send(collector, "/v1/track", track(writeKey=LIVE_KEY), headers=headers, client=peer)
    assert response.status == 200
    [event] = events(collector)
    assert event["context"]["ip"] == expected


def test_user_agent_header_fills_context_only_when_absent(collector: Collector) -> None:
    headers = {"user-agent": "header-ua"}
    send(collector, "/v1/track", track(writeKey=LIVE_KEY, messageId="a"), headers=headers)
    own = track(writeKey=LIVE_KEY, messageId="b", context={"userAgent": "client-ua"})
    send(collector, "/v1/track", own, headers=headers)
    send(collector, "/v1/track", track(writeKey=LIVE_KEY, messageId="c"))
    filled, kept, without = events(collector)
    assert filled["context"]["userAgent"] == "header-ua"
    assert kept["context"]["userAgent"] == "client-ua"
    assert "userAgent" not in without["context"]


def test_server_fields(collector: Collector) -> None:
    message = track(
        writeKey=LIVE_KEY,
        messageId="m-1",
        timestamp="2023-11-14T22:13:00.000Z",
        sentAt="2023-11-14T22:13:10.000Z",
        receivedAt="client says",
    )
    send(collector, "/v1/track", message)
    [event] = events(collector)
    assert event["receivedAt"] == RECEIVED_ISO
    # sentAt is 10 s after the event; it arrived at receivedAt: 10 s before that.
    assert event["timestamp"] == "2023-11-14T22:13:10.123Z"
    assert event["originalTimestamp"] == "2023-11-14T22:13:00.000Z"
    assert "writeKey" not in event


# -- retries ---------------------------------------------------------------------------


def test_a_retried_message_id_is_answered_200_and_stored_once(collector: Collector) -> None:
    message = track(writeKey=LIVE_KEY, messageId="retry-1")
    first = send(collector, "/v1/track", message)
    second = send(collector, "/v1/track", message)
    assert (first.status, answer(first)) == (200, {"success": True})
    assert (second.status, answer(second)) == (200, {"success": True})
    assert [e["messageId"] for e in events(collector)] == ["retry-1"]
    [rejection] = collector.store.rejections()
    assert (rejection.reason, rejection.message_id, rejection.source_id) == (
        "duplicate_message_id",
        "retry-1",
        LIVE_ID,
    )


def test_a_lone_surrogate_message_id_does_not_fail_the_sqlite_batch(tmp_path: Path) -> None:
    """The refused item's messageId is kept in the rejection; SQLite must be able to
    store it, or the whole batch is answered 503 on every retry."""
    collector = new_collector(storage=f"sqlite:///{tmp_path / 'events.db'}", commit_timeout=5)
    try:
        body = (
            b'{"writeKey":"live-key","batch":['
            b'{"type":"track","event":"e","userId":"u","messageId":"\\ud800"},'
            b'{"type":"track","event":"e","userId":"u","messageId":"good"}]}'
        )
        response = send(collector, "/v1/batch", body)
        assert response.status == 207
        assert [row.message_id for row in collector.store.events()] == ["good"]
        [rejection] = collector.store.rejections()
        assert (rejection.index, rejection.reason) == (0, "invalid_json")
    finally:
        collector.close()


# -- the core is framework-free ----------------------------------------------------------


def test_the_core_imports_no_web_framework_and_no_backend_driver() -> None:
    code = (
        "import fp_collect, fp_collect.dialects.segment, fp_collect.dialects.userevent, "
        "fp_collect.store.memory, fp_collect.store.sqlite; import sys; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'starlette','werkzeug','flask','fastapi','django','uvicorn','anyio',"
        "'psycopg','psycopg_pool','redis'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("field", ["userId", "anonymousId", "groupId", "previousId"])
def test_an_overlong_id_is_refused_alone_not_the_batch(collector: Collector, field: str) -> None:
    # Ids are index keys; PostgreSQL cannot index ~2.7 KB, so unbounded ids would fail the
    # whole batch there, forever. They are refused per event on every backend instead.
    hostile = {"type": "group" if field == "groupId" else "alias" if field == "previousId"
               else "track", "event": "Order Completed", "userId": "u", "groupId": "g",
               "previousId": "p", field: "x" * 3000, "messageId": "hostile"}  # fmt: skip
    body = {"writeKey": LIVE_KEY, "batch": [track(messageId="good"), hostile]}
    response = send(collector, "/v1/batch", body)
    assert response.status == 207
    [error] = answer(response)["Errors"]
    assert (error["index"], error["code"]) == (1, "invalid_field")
    assert field in error["Message"]
    assert [e["messageId"] for e in events(collector)] == ["good"]


def test_an_overlong_email_trait_is_kept_but_is_not_an_identity(collector: Collector) -> None:
    email = "a" * 300 + "@example.com"
    body = {"writeKey": LIVE_KEY, "type": "identify", "userId": "u", "traits": {"email": email}}
    assert send(collector, "/v1/identify", body).status == 200
    [event] = collector.store.events()
    assert event.profile_id is not None
    profile = collector.store.profile(event.profile_id)
    assert profile is not None and profile.traits["email"] == email
    assert [identity.kind for identity in profile.identities] == ["user_id"]
