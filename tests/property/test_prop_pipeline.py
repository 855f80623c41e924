"""Properties of the core pipeline, driven through ``Collector.route``/``handle``.

No adapter, no server: a neutral :class:`Request` goes in, a :class:`Response` and the
memory store's rows come out. Each property is something the seed (the HTTP Tracking
API) or the code's own docstrings promise. Hostile inputs are generated on purpose
(lone surrogates, NaN, 1e400, 2**70, deep nesting, duplicate keys, invalid UTF-8,
gzip bombs); every bug found is pinned as an ``@example`` so its fix can be verified.
"""

from __future__ import annotations

import base64
import copy
import gzip
import json
import re
from collections.abc import Mapping
from dataclasses import fields
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from urllib.parse import urlencode

from hypothesis import assume, example, given
from hypothesis import strategies as st

from fp_collect import Collector, Request, Response, Source
from fp_collect.auth import KeyRing
from fp_collect.dialects.segment import MESSAGE_TYPES, normalise_message
from fp_collect.errors import ConfigError, ItemRejected
from fp_collect.responses import PIXEL_GIF
from fp_collect.store import EventRecord, RejectionRecord
from fp_collect.timestamps import _parse_with_pattern, format_iso, parse_iso

# 2023-11-14T22:13:20.123Z, a whole number of milliseconds.
FIXED_MS = 1_700_000_000_123
FIXED = FIXED_MS / 1000
RECEIVED_ISO = "2023-11-14T22:13:20.123Z"
LIVE_KEY, OFF_KEY = "live-key", "off-key"
LIVE_ID = "src-live"
PEER = "203.0.113.9"
DOCUMENTED = frozenset({200, 204, 207, 400, 403, 405, 413, 415})
CANONICAL = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
EPOCH = datetime(1970, 1, 1)
MAX_CALL = 15 * 1024

SINGLE_PATHS = [(t, f"/v1/{t}") for t in MESSAGE_TYPES] + [
    (t, f"/v1/{t[0]}") for t in MESSAGE_TYPES
]
BATCH_PATHS = ["/v1/batch", "/v1/import", "/v1/b"]
WEBHOOK_PATHS = ["/v1/webhook", "/v1/w"]
PIXEL_PATHS = [f"/v1/pixel/{t}" for t in MESSAGE_TYPES]
POST_PATHS = [p for _, p in SINGLE_PATHS] + BATCH_PATHS + WEBHOOK_PATHS
ALL_PATHS = POST_PATHS + PIXEL_PATHS

# Every field the dialect or the pipeline reads or writes; generated extras avoid them.
KNOWN_FIELDS = frozenset(
    {
        "type",
        "userId",
        "anonymousId",
        "messageId",
        "event",
        "name",
        "category",
        "groupId",
        "previousId",
        "context",
        "integrations",
        "properties",
        "traits",
        "timestamp",
        "sentAt",
        "receivedAt",
        "originalTimestamp",
        "writeKey",
        "batch",
    }
)
# What the server may change or add (the seed's implicit fields, our enrichment).
SERVER_FIELDS = frozenset(
    {"writeKey", "type", "messageId", "timestamp", "originalTimestamp", "receivedAt", "context"}
)


def new_collector(**options: Any) -> Collector:
    return Collector(
        sources=[
            Source(write_key=LIVE_KEY, id=LIVE_ID),
            Source(write_key=OFF_KEY, id="src-off", enabled=False),
        ],
        storage="memory://",
        clock=lambda: FIXED,
        **options,
    )


def send(
    collector: Collector,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    query: str = "",
    client: str | None = PEER,
) -> Response:
    route = collector.route(path)
    assert route is not None, path
    return collector.handle(route, Request(method, path, query, dict(headers or {}), body, client))


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def to_json(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def canonical(value: object) -> str:
    """Strict equality for JSON values: ``1 == 1.0 == True`` in Python, not in JSON."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _no_constants(name: str) -> object:
    raise AssertionError(f"the response body contains {name}")


def json_body(response: Response) -> dict[str, Any]:
    assert dict(response.headers).get("content-type") == "application/json"
    parsed = json.loads(response.body, parse_constant=_no_constants)
    assert isinstance(parsed, dict)
    return parsed


def iso_from_ms(epoch_ms: int) -> str:
    moment = EPOCH + timedelta(milliseconds=epoch_ms)
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:"
        f"{moment.minute:02d}:{moment.second:02d}.{moment.microsecond // 1000:03d}Z"
    )


def write_iso(local: datetime, offset_minutes: int, style: str) -> str:
    """``local`` (a wall-clock time at ``offset_minutes`` east of UTC) in one of the
    shapes clients send. Written by hand: strftime drops zero padding for years < 1000."""
    date = f"{local.year:04d}-{local.month:02d}-{local.day:02d}"
    clock = f"{local.hour:02d}:{local.minute:02d}:{local.second:02d}"
    sign = "-" if offset_minutes < 0 else "+"
    hours, minutes = divmod(abs(offset_minutes), 60)
    offset = f"{sign}{hours:02d}:{minutes:02d}"
    millis = f"{local.microsecond // 1000:03d}"
    if style == "z":
        zone = "Z" if offset_minutes == 0 else offset
        return f"{date}T{clock}.{millis}{zone}"
    if style == "micro":
        return f"{date}T{clock}.{local.microsecond:06d}{offset}"
    if style == "compact":
        return f"{date}t{clock},{millis}{offset.replace(':', '')}"
    if style == "space":
        zone = "Z" if offset_minutes == 0 else offset
        return f"{date} {clock}.{millis}{zone}"
    raise AssertionError(style)


STYLES = st.sampled_from(["z", "micro", "compact", "space"])
OFFSETS = st.integers(-(23 * 60 + 59), 23 * 60 + 59)


def ms_datetimes(start: datetime, end: datetime) -> st.SearchStrategy[datetime]:
    return st.datetimes(min_value=start, max_value=end).map(
        lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000)
    )


_RECENT = ms_datetimes(datetime(2000, 1, 1), datetime(2040, 12, 31))


@st.composite
def iso_strings(draw: st.DrawFn) -> str:
    """A valid ISO-8601 instant between 2000 and 2040, in any accepted shape."""
    utc = draw(_RECENT)
    offset = draw(OFFSETS)
    return write_iso(utc + timedelta(minutes=offset), offset, draw(STYLES))


# -- JSON values ----------------------------------------------------------------------

# Text that looks like what the decoder hunts for, but is harmless inside a string.
DECOY_TEXT = st.sampled_from(
    [
        *("NaN", "Infinity", "\\ud800", "1e400", "9" * 25, "é", "日本語", "🎉", "\u2028", "\x00"),
        *("{[[", "-", "a -", "- ]", '\\" -'),
    ]
)
json_text = st.one_of(st.text(max_size=16), DECOY_TEXT)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    json_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_text, inner, max_size=4),
    max_leaves=10,
)
# Lighter values where many messages are drawn per example (batches).
small_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(json_text, inner, max_size=2),
    max_leaves=3,
)
nonempty = st.text(min_size=1, max_size=24)
extra_names = json_text.filter(lambda name: name not in KNOWN_FIELDS)


@st.composite
def contexts(draw: st.DrawFn, values: st.SearchStrategy[Any] = json_values) -> dict[str, Any]:
    context = draw(
        st.dictionaries(
            json_text.filter(lambda k: k not in ("ip", "userAgent")), values, max_size=3
        )
    )
    if draw(st.booleans()):
        context["ip"] = draw(st.sampled_from(["198.51.100.7", "2001:db8::1"]) | nonempty)
    if draw(st.booleans()):
        context["userAgent"] = draw(nonempty)
    return context


@lru_cache
def _optional_fields(values: st.SearchStrategy[Any]) -> dict[str, st.SearchStrategy[Any]]:
    # Built once per ``values``: constructing strategies on every draw is the slow part.
    return {
        "messageId": st.text(min_size=1, max_size=40),
        "name": st.text(max_size=20),
        "category": st.text(max_size=20),
        "properties": st.dictionaries(json_text, values, max_size=4),
        "traits": st.dictionaries(json_text, values, max_size=4),
        "context": contexts(values),
        "integrations": st.dictionaries(json_text, st.booleans() | values, max_size=3),
        "timestamp": iso_strings(),
        "sentAt": iso_strings(),
    }


@lru_cache
def _extras(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(extra_names, values, max_size=3)


@st.composite
def valid_messages(
    draw: st.DrawFn,
    message_type: str | None = None,
    with_type: bool = True,
    values: st.SearchStrategy[Any] = json_values,
) -> tuple[str, dict[str, Any]]:
    """A message every endpoint must accept, with arbitrary extra fields (``values``)."""
    kind = message_type or draw(st.sampled_from(MESSAGE_TYPES))
    message: dict[str, Any] = {}
    who = draw(st.sampled_from(["user", "anonymous", "both"]))
    if who != "anonymous":
        message["userId"] = draw(nonempty)
    if who != "user":
        message["anonymousId"] = draw(nonempty)
    required = {"track": "event", "group": "groupId", "alias": "previousId"}.get(kind)
    if required:
        message[required] = draw(nonempty)
    optional = _optional_fields(values)
    for name, strategy in optional.items():
        if draw(st.booleans()):
            message[name] = draw(strategy)
    message.update(draw(_extras(values)))
    if with_type:
        message["type"] = kind
    return kind, message


# -- 1. any request gets a documented answer --------------------------------------------

_BOMB = gzip.compress(b" " * 10_000_000)
_VALID = to_json({"writeKey": LIVE_KEY, "type": "track", "event": "e", "userId": "u"})
HOSTILE_VALUES = [
    b'"\\ud800"',
    b'"\\uDFFF"',
    b'"a\\udc00b"',
    b'"\xed\xa0\x80"',
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e400",
    b"-1E+400",
    str(2**70).encode(),
    str(-(2**64)).encode(),
    str(2**63).encode(),
    b"[" * 100 + b"]" * 100,
    b"[" * 5000 + b"]" * 5000,
    b'{"a":' * 100 + b"1" + b"}" * 100,
    b'{"\\ud800": 1}',
    # A minus sign with no digits, which ujson reads as 0: broken syntax.
    b"-",
    b"[-]",
    b'{"n":-\n}',
]
# Nesting beyond what the parser takes, and broken syntax ujson reads anyway: the body
# cannot be read, so it is refused whole.
# (ujson reads a UTF-8-encoded surrogate as a lone surrogate: refused with its event.)
REFUSE_WHOLE_BODY = {b"[" * 5000 + b"]" * 5000, b"-", b"[-]", b'{"n":-\n}'}
HOSTILE_BODIES = [
    b"",
    b"{",
    b"null",
    b"[]",
    b'"text"',
    b"NaN",
    b"\xef\xbb\xbf" + _VALID,
    b'{"userId":"a","userId":"b","type":"track","event":"e","writeKey":"live-key"}',
    b'{"writeKey":"live-key","type":"track","event":"e","userId":"\xc0\xaf"}',
    b'{"writeKey":"live-key","type":"track","event":"e","userId":"\xed\xa0\x80"}',
    b'{"writeKey":"live-key","type":"track","event":"e","userId":"\xff"}',
    b"\xff\xfe{\x00}\x00",
    b"[" * 5000 + b"]" * 5000,
    b'{"batch":' + b"[" * 100 + b"]" * 100 + b"}",
]
PLACEHOLDER = "\x01hostile\x01"


def splice(message: dict[str, Any], where: str, hostile: bytes) -> bytes:
    """``message`` as JSON with ``hostile`` (raw JSON text) placed at ``where``."""
    message = copy.deepcopy(message)
    if where == "properties":
        message["properties"] = {"x": [PLACEHOLDER]}
    elif where == "context":
        message["context"] = {"deep": {"y": PLACEHOLDER}}
    else:
        message["zz"] = PLACEHOLDER
    text = to_json(message)
    return text.replace(json.dumps(PLACEHOLDER).encode(), hostile)


@st.composite
def message_bodies(draw: st.DrawFn) -> bytes:
    """Plausible JSON bodies: valid, hostile-spliced, mutated, wrapped in a batch."""
    _, message = draw(valid_messages())
    if draw(st.booleans()):
        message["writeKey"] = draw(st.sampled_from([LIVE_KEY, OFF_KEY, "nope"]))
    mutation = draw(st.sampled_from(["none", "splice", "retype"]))
    if mutation == "retype":
        # Any known field given any JSON value.
        message[draw(st.sampled_from(sorted(KNOWN_FIELDS)))] = draw(json_values)
    wrap = draw(st.booleans())
    if mutation == "splice":
        hostile = draw(st.sampled_from(HOSTILE_VALUES))
        body = splice(message, draw(st.sampled_from(["properties", "context", "top"])), hostile)
        return b'{"writeKey":"live-key","batch":[' + body + b"]}" if wrap else body
    if wrap:
        return to_json({"writeKey": LIVE_KEY, "batch": [message, draw(json_values)]})
    return to_json(message)


@st.composite
def bodies_and_encodings(draw: st.DrawFn) -> tuple[bytes, str | None]:
    plain = draw(
        st.one_of(
            st.binary(max_size=200),
            st.sampled_from(HOSTILE_BODIES),
            message_bodies(),
        )
    )
    how = draw(st.sampled_from(["plain", "gzip", "truncated", "bomb", "bom"]))
    if how == "gzip":
        return gzip.compress(plain), draw(st.sampled_from(["gzip", "x-gzip", " GZIP "]))
    if how == "truncated":
        packed = gzip.compress(plain)
        return packed[: draw(st.integers(0, len(packed) - 1))], "gzip"
    if how == "bomb":
        return _BOMB, "gzip"
    if how == "bom":
        plain = b"\xef\xbb\xbf" + plain
    encoding = draw(
        st.none()
        | st.sampled_from(["identity", "", "br", "deflate", "gzip, br"])
        | st.text(st.characters(max_codepoint=255), max_size=8)
    )
    return plain, encoding


latin1 = st.text(st.characters(max_codepoint=255), max_size=30)


@st.composite
def header_maps(draw: st.DrawFn, encoding: str | None) -> dict[str, str]:
    """Headers as adapters build them: lower-case names, latin-1 values."""
    headers = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "content-type": st.sampled_from(
                    [
                        "application/json",
                        "text/plain",
                        "application/json; charset=utf-8",
                        "application/json; charset=latin-1",
                        "application/xml",
                        "multipart/form-data; boundary=x",
                        "",
                    ]
                )
                | latin1,
                "authorization": st.sampled_from(
                    [
                        basic(LIVE_KEY),
                        basic(OFF_KEY),
                        basic("nope"),
                        "Basic !!",
                        "Bearer x",
                        "Basic",
                    ]
                )
                | latin1,
                "origin": st.sampled_from(["https://shop.example", "null"]) | latin1,
                "user-agent": latin1,
                "x-forwarded-for": st.sampled_from(["198.51.100.1", "10.0.0.2, 1.2.3.4", "junk"])
                | latin1,
                "access-control-request-headers": latin1,
            },
        )
    )
    if encoding is not None:
        headers["content-encoding"] = encoding
    return headers


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    body, encoding = draw(bodies_and_encodings())
    return {
        "method": draw(
            st.sampled_from(["POST", "POST", "POST", "GET", "OPTIONS", "PUT", "HEAD", "DELETE"])
            | st.text(max_size=8)
        ),
        "path": draw(
            st.sampled_from(ALL_PATHS)
            | st.sampled_from(ALL_PATHS).map(lambda p: p + "/")
            | st.text(max_size=12).map(lambda s: "/v1/" + s)
        ),
        "query": draw(
            st.sampled_from(
                [
                    "",
                    "writeKey=live-key",
                    "writeKey=",
                    "writeKey=nope",
                    "data=!!",
                    "data=" + base64.urlsafe_b64encode(_VALID).decode(),
                ]
            )
            | latin1
        ),
        "headers": draw(header_maps(encoding)),
        "body": body,
        "client": draw(st.sampled_from([PEER, None, "10.0.0.1", "::1", "not-an-ip"])),
    }


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def assert_documented_answer(route_name: str, method: str, response: Response) -> None:
    assert response.status in DOCUMENTED, response
    for name, value in response.headers:
        # Adapters encode response headers as latin-1.
        name.encode("latin-1")
        value.encode("latin-1")
    content_type = dict(response.headers).get("content-type")
    if response.status == 204:
        assert response.body == b""
    elif content_type == "image/gif":
        assert route_name.startswith("pixel/")
        assert response.body == PIXEL_GIF
    else:
        body = json_body(response)
        # "No input produces a 500": an internal error is a bug that merely looks like a 400.
        assert body.get("code") != "internal_error", body
    if route_name.startswith("pixel/") and method == "GET":
        assert response.status == 200
        assert response.body == PIXEL_GIF


_OLD_TIMESTAMP = to_json(
    {"writeKey": LIVE_KEY, "event": "e", "userId": "u", "timestamp": "0001-01-01T00:00:00+01:00"}
)


@given(request=requests(), trusted=st.booleans())
# Bug: a batch item whose type is a list or an object crashes normalise_message
# (TypeError: unhashable type) and the whole batch is answered internal_error.
@example(
    request={
        "method": "POST",
        "path": "/v1/batch",
        "query": "",
        "headers": {},
        "body": to_json(
            {"writeKey": LIVE_KEY, "batch": [{"type": [], "userId": "u", "event": "e"}]}
        ),
        "client": PEER,
    },
    trusted=False,
)
# Bug: a timestamp before 0001-01-01T00:00:00Z (year 1 with a positive offset) is accepted
# by parse_iso, then format_iso overflows: OverflowError -> internal_error.
@example(
    request={
        "method": "POST",
        "path": "/v1/track",
        "query": "",
        "headers": {"content-type": "application/json"},
        "body": _OLD_TIMESTAMP,
        "client": PEER,
    },
    trusted=False,
)
@example(
    request={
        "method": "GET",
        "path": "/v1/pixel/track",
        "query": "data=" + base64.urlsafe_b64encode(_OLD_TIMESTAMP).decode(),
        "headers": {},
        "body": b"",
        "client": PEER,
    },
    trusted=False,
)
# Bug: a batch item refused for a lone surrogate keeps that surrogate in the rejection's
# message_id (segment.py, _batch): the SQLite store cannot encode it, the whole batch is
# answered 503 and every retry fails the same way.
@example(
    request={
        "method": "POST",
        "path": "/v1/batch",
        "query": "",
        "headers": {},
        "body": b'{"writeKey":"live-key","batch":[{"type":"track","event":"e","userId":"u",'
        b'"messageId":"\\ud800"}]}',
        "client": PEER,
    },
    trusted=False,
)
def test_any_request_gets_a_documented_answer(request: dict[str, Any], trusted: bool) -> None:
    collector = new_collector(trusted_proxies=("10.0.0.0/8",) if trusted else ())
    route = collector.route(request["path"])
    if route is None:
        path = request["path"]
        assert (path[:-1] if path.endswith("/") else path) not in ALL_PATHS
        return
    prepared = collector.prepare(route, Request(**request))
    records: list[EventRecord | RejectionRecord] = [
        *prepared.batch.events,
        *prepared.batch.rejections,
    ]
    for record in records:
        for field in fields(record):
            value = getattr(record, field.name)
            # Whatever the core hands a store must be storable text (SQLite, PostgreSQL).
            if isinstance(value, str) and not _utf8_encodable(value):
                raise AssertionError(f"{type(record).__name__}.{field.name} = {value!r}")
    response = collector.handle(route, Request(**request))
    assert_documented_answer(route.name, request["method"], response)


@given(
    message=valid_messages(),
    hostile=st.sampled_from(HOSTILE_VALUES),
    where=st.sampled_from(["properties", "context", "top"]),
    endpoint=st.sampled_from(["single", "batch", "webhook", "pixel"]),
)
def test_unstorable_values_are_refused_and_recorded(
    message: tuple[str, dict[str, Any]], hostile: bytes, where: str, endpoint: str
) -> None:
    """NaN, 1e400, integers beyond 64 bits, lone surrogates and absurd nesting anywhere in
    an otherwise valid event: that event is refused as invalid_json and recorded, never
    stored. In a batch a valid neighbour is stored, unless the body itself cannot be read
    (invalid UTF-8, or nesting beyond what the parser takes)."""
    kind, message_fields = message
    message_fields["writeKey"] = LIVE_KEY
    message_fields["messageId"] = "hostile"
    body = splice(message_fields, where, hostile)
    collector = new_collector()
    if endpoint == "pixel":
        assume(len(body) <= MAX_CALL)
        query = "data=" + base64.urlsafe_b64encode(body).decode().rstrip("=")
        response = send(collector, "GET", f"/v1/pixel/{kind}", query=query)
        assert (response.status, response.body) == (200, PIXEL_GIF)
    elif endpoint == "batch":
        neighbour = b'{"type":"track","event":"e","userId":"u","messageId":"fine"}'
        body = b'{"writeKey":"live-key","batch":[' + body + b"," + neighbour + b"]}"
        response = send(collector, "POST", "/v1/batch", body=body)
        answer = json_body(response)
        stored = [row.message_id for row in collector.store.events()]
        if hostile not in REFUSE_WHOLE_BODY:  # refused alone: the neighbour is stored
            assert response.status == 207, answer
            assert [(e["index"], e["code"]) for e in answer["Errors"]] == [(0, "invalid_json")]
            assert [e["messageId"] for e in answer["Errors"]] == ["hostile"]
            assert stored == ["fine"]
            assert [r.index for r in collector.store.rejections()] == [0]
        else:
            assert response.status == 400
            assert answer["code"] == "invalid_json"
            assert stored == []
        assert [r.reason for r in collector.store.rejections()] == ["invalid_json"]
        return
    else:
        path = f"/v1/{kind}" if endpoint == "single" else "/v1/webhook"
        assume(len(body) <= MAX_CALL)
        response = send(collector, "POST", path, body=body)
        assert response.status == 400
        assert json_body(response)["code"] == "invalid_json"
    assert list(collector.store.events()) == []
    assert [r.reason for r in collector.store.rejections()] == ["invalid_json"]


# -- 2. valid messages are stored with their fields intact ------------------------------

DELIVERIES = [
    "single-body-key",
    "single-short-path",
    "single-basic-auth",
    "batch-top-key",
    "batch-basic-auth",
    "batch-item-key",
    "webhook-body-key",
    "webhook-query-key",
]


@given(
    message=valid_messages(),
    delivery=st.sampled_from(DELIVERIES),
    path_variant=st.integers(0, 2),
    drop_type=st.booleans(),
    content_type=st.sampled_from([None, "application/json", "text/plain; charset=UTF-8"]),
    user_agent=st.none() | nonempty,
    client=st.sampled_from([PEER, None]),
)
def test_valid_messages_are_stored_intact(
    message: tuple[str, dict[str, Any]],
    delivery: str,
    path_variant: int,
    drop_type: bool,
    content_type: str | None,
    user_agent: str | None,
    client: str | None,
) -> None:
    kind, original = message
    sent = copy.deepcopy(original)
    headers: dict[str, str] = {}
    if content_type is not None:
        headers["content-type"] = content_type
    if user_agent is not None:
        headers["user-agent"] = user_agent
    query = ""
    if delivery.startswith("single"):
        path = f"/v1/{kind[0]}" if delivery == "single-short-path" else f"/v1/{kind}"
        if drop_type:  # the path names the type
            del sent["type"]
        if delivery == "single-basic-auth":
            headers["authorization"] = basic(LIVE_KEY)
        else:
            sent["writeKey"] = LIVE_KEY
        body: object = sent
    elif delivery.startswith("batch"):
        path = BATCH_PATHS[path_variant]
        batch: dict[str, Any] = {"batch": [sent]}
        body = batch
        if delivery == "batch-top-key":
            batch["writeKey"] = LIVE_KEY
        elif delivery == "batch-item-key":
            sent["writeKey"] = LIVE_KEY
        else:
            headers["authorization"] = basic(LIVE_KEY)
    else:
        path = WEBHOOK_PATHS[path_variant % 2]
        body = sent
        if delivery == "webhook-query-key":
            query = urlencode({"writeKey": LIVE_KEY})
            sent["writeKey"] = "overridden"
        else:
            sent["writeKey"] = LIVE_KEY
    collector = new_collector()
    response = send(
        collector, "POST", path, body=to_json(body), headers=headers, query=query, client=client
    )

    assert (response.status, json_body(response)) == (200, {"success": True})
    assert list(collector.store.rejections()) == []
    [row] = list(collector.store.events())
    stored = json.loads(row.payload)

    for name, value in original.items():
        if name not in SERVER_FIELDS:
            assert canonical(stored[name]) == canonical(value), name
    assert set(stored) - set(original) <= SERVER_FIELDS
    assert "writeKey" not in stored
    assert stored["type"] == row.type == kind
    assert stored["receivedAt"] == row.received_at == RECEIVED_ISO
    if original.get("messageId"):
        assert stored["messageId"] == original["messageId"]
    else:
        assert isinstance(stored["messageId"], str) and stored["messageId"]
    assert row.message_id == stored["messageId"]
    assert row.source_id == LIVE_ID
    if "timestamp" in original:
        assert stored["originalTimestamp"] == original["timestamp"]
        assert CANONICAL.fullmatch(stored["timestamp"])
    else:
        assert "originalTimestamp" not in stored
        assert stored["timestamp"] == RECEIVED_ISO
    assert row.timestamp == stored["timestamp"]
    # context gains ip/userAgent only where the client left them out (or empty).
    context = dict(original.get("context") or {})
    if client is not None and not context.get("ip"):
        context["ip"] = client
    if user_agent is not None and not context.get("userAgent"):
        context["userAgent"] = user_agent
    assert canonical(stored["context"]) == canonical(context)


# -- 3. normalising twice equals normalising once ---------------------------------------


@given(message=valid_messages(with_type=False), forced=st.booleans())
def test_normalising_a_valid_message_is_idempotent(
    message: tuple[str, dict[str, Any]], forced: bool
) -> None:
    kind, fields = message
    if not forced:
        fields["type"] = kind
    once = copy.deepcopy(fields)
    assert normalise_message(once, kind if forced else None, 255) == kind
    twice = copy.deepcopy(once)
    assert normalise_message(twice, kind if forced else None, 255) == kind
    assert canonical(twice) == canonical(once)
    untouched = {k: v for k, v in fields.items() if k not in ("type", "messageId")}
    assert canonical({k: v for k, v in once.items() if k not in ("type", "messageId")}) == (
        canonical(untouched)
    )


field_values = st.dictionaries(
    st.sampled_from(sorted(KNOWN_FIELDS)) | json_text, json_values | nonempty, max_size=8
)


@given(message=field_values, forced=st.none() | st.sampled_from(MESSAGE_TYPES))
# Bug: `message_type not in _VALID_TYPES` hashes the client's value (segment.py:360).
@example(message={"type": [], "userId": "u"}, forced=None)
@example(message={"type": {"a": 1}, "userId": "u"}, forced=None)
def test_normalise_returns_a_type_or_raises_item_rejected(
    message: dict[str, Any], forced: str | None
) -> None:
    """Either a normalised message or the one documented error, nothing else."""
    working = copy.deepcopy(message)
    try:
        kind = normalise_message(working, forced, 255)
    except ItemRejected as rejected:
        assert rejected.reason and rejected.message
        return
    assert kind in MESSAGE_TYPES
    assert working["type"] == kind
    again = copy.deepcopy(working)
    assert normalise_message(again, forced, 255) == kind
    assert canonical(again) == canonical(working)


# -- 4. a batch with k invalid items among n valid ones ---------------------------------


@st.composite
def invalid_items(draw: st.DrawFn) -> tuple[object, str]:
    kind = draw(
        st.sampled_from(
            ["not_object", "no_user", "no_event", "bad_timestamp", "bad_properties", "bad_type"]
        )
    )
    if kind == "not_object":
        return draw(st.sampled_from([1, "text", None, [], True, 1.5, [{}]])), "invalid_event"
    if kind == "no_event":
        _, message = draw(valid_messages("track", values=small_values))
        if draw(st.booleans()):
            del message["event"]
        else:
            message["event"] = ""
        return message, "missing_event"
    _, message = draw(valid_messages(values=small_values))
    if kind == "no_user":
        message.pop("userId", None)
        message.pop("anonymousId", None)
        return message, "missing_user_id"
    if kind == "bad_timestamp":
        bad = ["yesterday", "2020-13-01T00:00:00Z", "2020-02-30", "", "2020-01-01T25:00Z", 12345]
        message[draw(st.sampled_from(["timestamp", "sentAt"]))] = draw(st.sampled_from(bad))
        return message, "invalid_timestamp"
    if kind == "bad_properties":
        message["properties"] = draw(st.sampled_from([[], "x", 1, True, [1, 2]]))
        return message, "invalid_field"
    message["type"] = draw(st.sampled_from(["nonsense", "Track", 5, None, [], {}]))
    return message, "invalid_type"


@st.composite
def batch_plans(draw: st.DrawFn) -> list[tuple[str, object, str | None]]:
    valid = draw(st.lists(valid_messages(values=small_values).map(lambda m: m[1]), max_size=5))
    invalid = draw(st.lists(invalid_items(), max_size=5))
    assume(valid or invalid)
    plan: list[tuple[str, object, str | None]] = [("valid", m, None) for m in valid]
    plan += [("invalid", item, code) for item, code in invalid]
    return draw(st.permutations(plan))


@given(plan=batch_plans(), key_in_header=st.booleans())
# Bug: an unhashable type crashes the batch; the valid neighbour is lost (internal_error).
@example(
    plan=[
        ("invalid", {"type": [], "userId": "u"}, "invalid_type"),
        ("valid", {"type": "track", "event": "e", "userId": "u"}, None),
    ],
    key_in_header=False,
)
def test_batch_stores_exactly_the_valid_items(
    plan: list[tuple[str, object, str | None]], key_in_header: bool
) -> None:
    items: list[object] = []
    for index, (_, item, _) in enumerate(plan):
        if isinstance(item, dict):
            item = {**item, "messageId": f"m-{index}"}
        items.append(item)
    body: dict[str, object] = {"batch": items}
    headers = {"content-type": "application/json"}
    if key_in_header:
        headers["authorization"] = basic(LIVE_KEY)
    else:
        body["writeKey"] = LIVE_KEY
    collector = new_collector()
    response = send(collector, "POST", "/v1/batch", body=to_json(body), headers=headers)

    valid_at = [i for i, (what, _, _) in enumerate(plan) if what == "valid"]
    invalid_at = [i for i, (what, _, _) in enumerate(plan) if what == "invalid"]
    codes = [code for what, _, code in plan if what == "invalid"]
    stored = list(collector.store.events())
    assert [row.message_id for row in stored] == [f"m-{i}" for i in valid_at]
    rejections = list(collector.store.rejections())
    assert [r.index for r in rejections] == invalid_at
    assert [r.reason for r in rejections] == codes
    assert all(r.source_id == LIVE_ID for r in rejections)
    answer = json_body(response)
    if not invalid_at:
        assert (response.status, answer) == (200, {"success": True})
        return
    assert response.status == (207 if valid_at else 400)
    assert answer["Success"] is False
    assert answer["code"] == ("partial_success" if valid_at else "invalid_batch")
    errors = answer["Errors"]
    assert [e["index"] for e in errors] == invalid_at
    assert [e["code"] for e in errors] == codes
    for error, position in zip(errors, invalid_at, strict=True):
        assert error["Error"] == "Bad Request"
        assert error["messageId"] == (
            f"m-{position}" if isinstance(items[position], dict) else None
        )


# -- 5. timestamps ----------------------------------------------------------------------


@given(moment=ms_datetimes(datetime(1, 1, 1), datetime(9999, 12, 31, 23, 59, 59, 999000)))
# Bug: strftime("%Y") does not zero-pad years below 1000 on glibc: "999-12-31T..." is
# written, which is not ISO-8601, does not sort as text and parse_iso cannot read back.
@example(moment=datetime(999, 12, 31, 23, 59, 59, 999000))
@example(moment=datetime(1, 1, 1))
def test_format_iso_round_trips(moment: datetime) -> None:
    epoch_ms = (moment - EPOCH) // timedelta(milliseconds=1)
    text = format_iso(epoch_ms / 1000)
    assert text == iso_from_ms(epoch_ms)
    parsed = parse_iso(text)
    assert parsed is not None
    assert round(parsed * 1000) == epoch_ms
    assert format_iso(parsed) == text


@given(
    local=st.datetimes(min_value=datetime(1000, 1, 2), max_value=datetime(9999, 12, 30)),
    offset=OFFSETS,
    style=STYLES,
)
def test_parse_iso_reads_every_shape_as_the_same_instant(
    local: datetime, offset: int, style: str
) -> None:
    text = write_iso(local, offset, style)
    expected_us = (local - EPOCH - timedelta(minutes=offset)) // timedelta(microseconds=1)
    if style != "micro":
        expected_us -= local.microsecond % 1000
    parsed = parse_iso(text)
    assert parsed is not None
    assert abs(parsed * 1_000_000 - expected_us) < 100  # float resolution at year 9999


@st.composite
def iso_like(draw: st.DrawFn) -> str:
    """Strings near ISO-8601: the shapes clients send and the ones parsers disagree on."""
    date = draw(
        st.sampled_from(
            ["2020-01-01", "2020-02-29", "1999-12-31", "20200101", "2020-W01-1", "2020-13-01"]
        )
    )
    time = draw(
        st.sampled_from(
            [
                *("", "10", "10:00", "1000", "10:00:00", "100000", "10:00:00.5"),
                *("10:00:00,123", "10:00:00.123456", "10:00:00.123456789", "10:00:00."),
                *("24:00:00", "23:59:60"),
            ]
        )
    )
    separator = draw(st.sampled_from(["T", "t", " ", "+", "_", "X", ""])) if time else ""
    zone = draw(
        st.sampled_from(["", "Z", "z", "+05:30", "+0530", "+05", "-00:00", "+05:30:15"])
        | st.sampled_from([" +05:00", "+24:00", "-23:59"])
    )
    return date + separator + time + zone


@given(text=iso_like() | iso_strings())
# Bug: on Python 3.11+ parse_iso hands the text to datetime.fromisoformat, which reads
# other shapes than the pattern used on 3.10 (setup.cfg supports >=3.10), so one input
# means different things on different Pythons:
@example(text="2020-01-01+05:00")  # 3.11: 05:00 UTC (any char separates); 3.10: 19:00 UTC
@example(text="2020-01-01 10:00:00.123z")  # refused on 3.11, accepted on 3.10
@example(text="20200101T101010Z")  # accepted on 3.11, refused on 3.10
@example(text="2020-01-01T10:00:00 +05:00")  # accepted on 3.11, refused on 3.10
def test_parse_iso_means_the_same_on_every_supported_python(text: str) -> None:
    """``_parse_with_pattern`` is what parse_iso does on Python 3.10."""
    fast, portable = parse_iso(text), _parse_with_pattern(text)
    assert (fast is None) == (portable is None), (fast, portable)
    if fast is not None and portable is not None:
        assert abs(fast - portable) < 1e-3


@given(
    event=ms_datetimes(datetime(1990, 1, 1), datetime(2060, 1, 1)),
    skew_ms=st.integers(-10 * 86_400_000, 10 * 86_400_000),
    offsets=st.tuples(OFFSETS, OFFSETS),
    styles=st.tuples(STYLES, STYLES),
    batch_level=st.booleans(),
    max_future=st.sampled_from([0, 300, 3600]),
)
def test_skew_correction(
    event: datetime,
    skew_ms: int,
    offsets: tuple[int, int],
    styles: tuple[str, str],
    batch_level: bool,
    max_future: int,
) -> None:
    """sentAt = timestamp + d  =>  stored timestamp = receivedAt - d, unless that is more
    than max_future_seconds after receivedAt (then receivedAt)."""
    # At exactly the limit the float arithmetic may fall either side; skip that instant.
    assume(skew_ms != -max_future * 1000)
    sent_moment = event + timedelta(milliseconds=skew_ms)
    timestamp = write_iso(event + timedelta(minutes=offsets[0]), offsets[0], styles[0])
    sent_at = write_iso(sent_moment + timedelta(minutes=offsets[1]), offsets[1], styles[1])
    message: dict[str, object] = {"type": "track", "event": "e", "userId": "u"}
    message["timestamp"] = timestamp
    body: dict[str, object] = {"writeKey": LIVE_KEY, "batch": [message]}
    if batch_level:
        body["sentAt"] = sent_at
    else:
        message["sentAt"] = sent_at
    collector = new_collector(max_future_seconds=max_future)
    response = send(collector, "POST", "/v1/batch", body=to_json(body))
    assert response.status == 200
    [row] = list(collector.store.events())
    stored = json.loads(row.payload)
    corrected_ms = FIXED_MS - skew_ms
    if corrected_ms > FIXED_MS + max_future * 1000:
        corrected_ms = FIXED_MS
    assert stored["timestamp"] == row.timestamp == iso_from_ms(corrected_ms)
    assert stored["originalTimestamp"] == timestamp
    assert stored["receivedAt"] == RECEIVED_ISO


@given(
    local=st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59)),
    offset=OFFSETS,
    style=STYLES,
    with_sent_at=st.booleans(),
)
# Bug: year 1 with a positive offset is before 0001-01-01T00:00:00Z: format_iso overflows.
@example(local=datetime(1, 1, 1), offset=60, style="z", with_sent_at=False)
# Bug: years below 1000 are written without zero padding ("999-12-31T...").
@example(local=datetime(999, 12, 31), offset=0, style="z", with_sent_at=False)
def test_any_accepted_timestamp_is_stored_in_canonical_form(
    local: datetime, offset: int, style: str, with_sent_at: bool
) -> None:
    """Validation and storage agree: a timestamp parse_iso accepts is stored with a
    canonical ``YYYY-MM-DDTHH:MM:SS.mmmZ`` timestamp; one it refuses is answered
    invalid_timestamp. Nothing crashes."""
    timestamp = write_iso(local, offset, style)
    message = {"writeKey": LIVE_KEY, "event": "e", "userId": "u", "timestamp": timestamp}
    if with_sent_at:
        message["sentAt"] = RECEIVED_ISO
    collector = new_collector()
    response = send(collector, "POST", "/v1/track", body=to_json(message))
    if parse_iso(timestamp) is None:
        assert response.status == 400
        assert json_body(response)["code"] == "invalid_timestamp"
        return
    assert (response.status, json_body(response)) == (200, {"success": True})
    [row] = list(collector.store.events())
    assert CANONICAL.fullmatch(row.timestamp), row.timestamp
    assert parse_iso(row.timestamp) is not None
    assert json.loads(row.payload)["originalTimestamp"] == timestamp


# -- 6. authentication ------------------------------------------------------------------

config_keys = st.text(min_size=1, max_size=12).filter(lambda k: ":" not in k)


@st.composite
def key_rings(draw: st.DrawFn) -> tuple[list[Source], object]:
    pairs = draw(
        st.lists(st.tuples(config_keys, st.booleans()), max_size=4, unique_by=lambda p: p[0])
    )
    sources = [Source(write_key=k, id=f"s{i}", enabled=e) for i, (k, e) in enumerate(pairs)]
    keys = [k for k, _ in pairs]
    near = (
        st.sampled_from(keys).flatmap(
            lambda k: st.sampled_from(
                [k + "x", k[:-1], k.upper(), k.lower(), " " + k, k + "\x00", k + "\udc80", k * 2]
            )
        )
        if keys
        else st.text()
    )
    presented = draw(
        st.one_of(
            st.sampled_from(keys) if keys else st.text(),
            near,
            st.text(),
            st.none(),
            st.integers(),
            st.just(b"bytes"),
            st.just(["list"]),
        )
    )
    return sources, presented


@given(ring=key_rings())
def test_only_an_enabled_sources_exact_key_authenticates(ring: tuple[list[Source], object]) -> None:
    sources, presented = ring
    expected = next(
        (
            s
            for s in sources
            if s.enabled and isinstance(presented, str) and s.write_key == presented
        ),
        None,
    )
    assert KeyRing(sources).resolve(presented) is expected


@given(
    key=st.text(st.characters() | st.characters(categories=["Cs"]), min_size=1).filter(
        lambda k: ":" not in k
    )
)
# Bug: a key that is not UTF-8 encodable (e.g. from os.environ via surrogateescape) gets
# UnicodeEncodeError from Source (auth id digest) and from KeyRing.resolve, not ConfigError.
@example(key="a\udcff")
def test_a_source_key_is_refused_eagerly_or_authenticates(key: str) -> None:
    for source_id in ("", "explicit"):  # "" is Source's default: an id derived from the key
        try:
            source = Source(write_key=key, id=source_id)
        except ConfigError:
            continue
        assert KeyRing([source]).resolve(key) is source


unknown_keys = st.text(min_size=1, max_size=20).filter(
    lambda k: ":" not in k and k not in (LIVE_KEY, OFF_KEY)
)


placements = st.sampled_from(POST_PATHS).flatmap(
    lambda path: st.tuples(
        st.just(path),
        st.sampled_from(
            ["header", "body", "query"] if path in WEBHOOK_PATHS else ["header", "body"]
        ),
    )
)


@given(where=placements, unknown=unknown_keys, message=valid_messages())
def test_bad_keys_get_one_identical_answer(
    where: tuple[str, str], unknown: str, message: tuple[str, dict[str, Any]]
) -> None:
    """Missing, unknown and disabled keys are indistinguishable on every POST endpoint."""
    path, placement = where
    _, fields = message
    answers = []
    for key in (None, unknown, OFF_KEY):
        headers = {"content-type": "application/json"}
        query = ""
        outer: dict[str, Any] = {"batch": [fields]} if path in BATCH_PATHS else dict(fields)
        if key is not None:
            if placement == "header":
                headers["authorization"] = basic(key)
            elif placement == "body":
                outer["writeKey"] = key
            else:
                query = urlencode({"writeKey": key})
        response = send(
            new_collector(), "POST", path, body=to_json(outer), headers=headers, query=query
        )
        answers.append((response.status, response.headers, response.body))
    assert answers[0] == answers[1] == answers[2]
    status, _, body = answers[0]
    assert status == 400
    assert json.loads(body)["code"] == "invalid_write_key"


@given(path=st.sampled_from(BATCH_PATHS), unknown=unknown_keys, message=valid_messages())
def test_bad_item_keys_get_one_identical_answer(
    path: str, unknown: str, message: tuple[str, dict[str, Any]]
) -> None:
    """Per-item keys: unknown and disabled are indistinguishable, whether a valid item
    sits beside the bad one (refused alone, 207) or not (the batch is refused once)."""
    for neighbour in (False, True):
        answers = []
        for key in (unknown, OFF_KEY):
            items = [{**message[1], "writeKey": key, "messageId": "m-0"}]
            if neighbour:
                items.append({**message[1], "writeKey": LIVE_KEY, "messageId": "m-1"})
            response = send(new_collector(), "POST", path, body=to_json({"batch": items}))
            answers.append((response.status, response.headers, response.body))
        assert answers[0] == answers[1]
        answer = json.loads(answers[0][2])
        if neighbour:
            assert answers[0][0] == 207
            assert [e["code"] for e in answer["Errors"]] == ["invalid_write_key"]
        else:
            assert answers[0][0] == 400
            assert answer["code"] == "invalid_write_key"
