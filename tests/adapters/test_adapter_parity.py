"""The ASGI and WSGI adapters give byte-identical answers and store identical rows.

Every row of the table goes through Starlette + the ASGI middleware (TestClient) and
through Flask + ``init_app`` (werkzeug's test Client), each with its own memory store
and the same fixed clock and peer address. Status, headers, body, stored events and
stored rejections must all be equal.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from flask import Flask
from starlette.applications import Starlette
from starlette.testclient import TestClient
from werkzeug.test import Client

from fp_collect import Collector, Source
from fp_collect.adapters import asgi, wsgi

KEY = "wk_parity"
SHOP = "https://shop.example"
SOURCE = Source(write_key=KEY, id="src_parity", allowed_origins=(SHOP,))
PEER = "203.0.113.20"
NOW = 1700000000.0
AUTH = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
WRONG_AUTH = "Basic " + base64.b64encode(b"not-a-key:").decode()
JSON = "application/json"


def msg(message_id: str, type_: str = "track", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"userId": "u-1", "messageId": message_id, "type": type_}
    if type_ == "track":
        base["event"] = "Order Completed"
        base["properties"] = {"total": 42, "currency": "EUR"}
    base["timestamp"] = "2023-11-14T22:13:15.000Z"
    base.update(fields)
    return base


def dumps(value: object) -> bytes:
    return json.dumps(value).encode()


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    query: str = ""
    expect: int = 200
    # what the request leaves in the store; derived from ``expect`` when None
    stores: frozenset[str] | None = None

    def leaves(self) -> frozenset[str]:
        if self.stores is not None:
            return self.stores
        if self.expect == 200:
            return frozenset({"events"})
        if self.expect == 207:
            return frozenset({"events", "rejections"})
        if self.expect in (204, 405) or self.method == "OPTIONS":
            return frozenset()
        return frozenset({"rejections"})


def post(
    name: str,
    path: str,
    body: bytes,
    expect: int = 200,
    stores: frozenset[str] | None = None,
    **headers: str,
) -> Case:
    merged = {"content-type": JSON, "authorization": AUTH}
    merged.update({k.replace("_", "-"): v for k, v in headers.items()})
    present = {k: v for k, v in merged.items() if v}
    return Case(name, "POST", path, body, present, expect=expect, stores=stores)


def pixel_data(message: dict[str, Any]) -> str:
    return "data=" + base64.urlsafe_b64encode(dumps(message)).decode().rstrip("=")


BIG_PROPERTIES = {"pad": "x" * 16_000}
CASES = [
    post("track", "/v1/track", dumps(msg("m-track"))),
    post("track-short", "/v1/t", dumps(msg("m-t"))),
    post(
        "identify",
        "/v1/identify",
        dumps(msg("m-identify", "identify", traits={"email": "a@example.com"})),
    ),
    post("identify-short", "/v1/i", dumps(msg("m-i", "identify"))),
    post("page", "/v1/page", dumps(msg("m-page", "page", name="Home", properties={"p": 1}))),
    post("screen", "/v1/screen", dumps(msg("m-screen", "screen", name="Settings"))),
    post("group", "/v1/group", dumps(msg("m-group", "group", groupId="g-1"))),
    post("alias", "/v1/alias", dumps(msg("m-alias", "alias", previousId="anon-1"))),
    post(
        "batch",
        "/v1/batch",
        dumps(
            {
                "batch": [msg("m-b1"), msg("m-b2", "identify"), msg("m-b3", "page")],
                "context": {"locale": "en-GB"},
                "sentAt": "2023-11-14T22:13:20.000Z",
            }
        ),
    ),
    post(
        "batch-partial",
        "/v1/batch",
        dumps({"batch": [msg("m-ok"), msg("m-anon", userId=None), "not an object"]}),
        207,
    ),
    post(
        "batch-duplicate-inside",
        "/v1/batch",
        dumps({"batch": [msg("m-same"), msg("m-same", event="Again")]}),
        # the second copy is answered like a success and recorded as a duplicate
        stores=frozenset({"events", "rejections"}),
    ),
    post("import", "/v1/import", dumps({"batch": [msg("m-import")]})),
    post(
        "analytics-js-batch",
        "/v1/b",
        dumps({"writeKey": KEY, "batch": [{**msg("m-ajs"), "writeKey": KEY}]}),
        content_type="text/plain",
        authorization="",
    ),
    Case("pixel", "GET", "/v1/pixel/track", query=pixel_data({**msg("m-px"), "writeKey": KEY})),
    Case(
        "pixel-garbage",
        "GET",
        "/v1/pixel/page",
        query="data=%%%not-base64",
        stores=frozenset({"rejections"}),
    ),
    post(
        "webhook-single",
        "/v1/webhook",
        dumps(msg("m-hook")),
        authorization="",
    ),
    post(
        "webhook-batch-short",
        "/v1/w",
        dumps({"batch": [msg("m-w1"), msg("m-w2")]}),
        authorization="",
    ),
    post("bad-json", "/v1/track", b'{"userId": "u-1", "event": ', 400),
    post("empty-body", "/v1/track", b"", 400),
    post("wrong-key", "/v1/track", dumps(msg("m-wrong")), 400, authorization=WRONG_AUTH),
    post("missing-key", "/v1/identify", dumps(msg("m-nokey", "identify")), 400, authorization=""),
    post("missing-key-batch", "/v1/batch", dumps({"batch": [msg("m-nk")]}), 400, authorization=""),
    post(
        "wrong-header-key-beats-body-key",
        "/v1/track",
        dumps({**msg("m-both"), "writeKey": KEY}),
        400,
        authorization=WRONG_AUTH,
    ),
    post(
        "header-key-beats-batch-body-key",
        "/v1/batch",
        dumps({"writeKey": "not-a-key", "batch": [msg("m-hdr")]}),
    ),
    post("no-user-id", "/v1/track", dumps(msg("m-nouser", userId=None)), 400),
    post("no-event-name", "/v1/t", dumps(msg("m-noevent", event="")), 400),
    post(
        "gzip",
        "/v1/batch",
        gzip.compress(dumps({"batch": [msg("m-gz1"), msg("m-gz2")]}), mtime=0),
        content_encoding="gzip",
    ),
    post("gzip-broken", "/v1/batch", b"\x1f\x8b not gzip at all", 400, content_encoding="gzip"),
    post("over-size", "/v1/track", dumps(msg("m-big", properties=BIG_PROPERTIES)), 413),
    post(
        "over-size-batch",
        "/v1/batch",
        dumps({"batch": [msg(f"m-{i}", properties=BIG_PROPERTIES) for i in range(35)]}),
        413,
    ),
    post(
        "event-too-large-in-batch",
        "/v1/batch",
        dumps({"batch": [msg("m-small"), msg("m-large", properties=BIG_PROPERTIES)]}),
        207,
    ),
    post(
        "text-plain-key-in-body",
        "/v1/t",
        dumps({**msg("m-text"), "writeKey": KEY}),
        content_type="text/plain;charset=UTF-8",
        authorization="",
    ),
    post("no-content-type", "/v1/track", dumps(msg("m-noct")), content_type=""),
    post(
        "wrong-content-type",
        "/v1/track",
        b"userId=u-1",
        415,
        content_type="application/x-www-form-urlencoded",
    ),
    post(
        "wrong-charset",
        "/v1/track",
        dumps(msg("m-latin")),
        415,
        content_type=f"{JSON}; charset=latin-1",
    ),
    Case("wrong-method-get", "GET", "/v1/track", expect=405),
    Case(
        "wrong-method-put",
        "PUT",
        "/v1/batch",
        dumps({"batch": []}),
        {"content-type": JSON},
        expect=405,
    ),
    Case("pixel-post", "POST", "/v1/pixel/track", b"{}", {"content-type": JSON}, expect=405),
    Case("wrong-method-delete", "DELETE", "/v1/b", expect=405),
    # (httpx drops a HEAD answer's body, so for HEAD only the rest is compared)
    Case("wrong-method-head", "HEAD", "/v1/track", expect=405),
    Case("options-without-origin", "OPTIONS", "/v1/track", expect=403),
    Case(
        "preflight",
        "OPTIONS",
        "/v1/t",
        headers={
            "origin": SHOP,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type",
        },
        expect=204,
    ),
    Case(
        "preflight-evil", "OPTIONS", "/v1/t", headers={"origin": "https://evil.example"}, expect=403
    ),
    post("cors-post", "/v1/track", dumps(msg("m-cors")), origin=SHOP),
    post("evil-origin", "/v1/track", dumps(msg("m-evil")), 403, origin="https://evil.example"),
    post("trailing-slash", "/v1/track/", dumps(msg("m-slash"))),
    post("percent-encoded-path", "/v1/%74rack", dumps(msg("m-pct"))),
    post(
        "forwarded-for",
        "/v1/track",
        dumps(msg("m-xff")),
        x_forwarded_for="198.51.100.23, 203.0.113.5",
    ),
    post(
        "client-context-wins",
        "/v1/track",
        dumps(msg("m-ctx", context={"ip": "192.0.2.1", "userAgent": "their-agent"})),
    ),
]
# the webhook's key comes in the query string
CASES = [
    dataclasses.replace(c, query=f"writeKey={KEY}") if c.path in ("/v1/webhook", "/v1/w") else c
    for c in CASES
]


def build_collector() -> Collector:
    return Collector(
        sources=[SOURCE],
        storage="memory://",
        prefix="/collect",
        trusted_proxies=("203.0.113.0/24",),
        clock=lambda: NOW,
    )


@dataclass
class Outcome:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    events: list[dict[str, Any]]
    rejections: list[dict[str, Any]]


def stored(collector: Collector) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    events = [dataclasses.asdict(e) for e in collector.store.events()]
    # Profile ids are random; what must match is which events share a profile, so each
    # id is replaced by the order in which it first appears.
    first_seen: dict[str, str] = {}
    for event in events:
        if event["profile_id"] is not None:
            event["profile_id"] = first_seen.setdefault(event["profile_id"], f"P{len(first_seen)}")
    rejections = [dataclasses.asdict(r) for r in collector.store.rejections()]
    return events, rejections


def request_headers(case: Case) -> dict[str, str]:
    return {"user-agent": "parity/1.0", **case.headers}


def through_asgi(case: Case) -> Outcome:
    collector = build_collector()
    app = Starlette()
    app.add_middleware(asgi.CollectorMiddleware, collector=collector)
    client = TestClient(app, client=(PEER, 50000))
    url = "/collect" + case.path + (f"?{case.query}" if case.query else "")
    response = client.request(case.method, url, content=case.body, headers=request_headers(case))
    headers = sorted((k.lower(), v) for k, v in response.headers.multi_items())
    return Outcome(response.status_code, headers, response.content, *stored(collector))


def through_wsgi(case: Case) -> Outcome:
    collector = build_collector()
    app = Flask(__name__)
    assert wsgi.init_app(app, collector=collector) is collector
    client = Client(app)
    response = client.open(
        "/collect" + case.path,
        method=case.method,
        query_string=case.query or None,
        data=case.body,
        headers=list(request_headers(case).items()),
        environ_base={"REMOTE_ADDR": PEER},
    )
    headers = sorted((k.lower(), v) for k, v in response.headers.items())
    return Outcome(response.status_code, headers, response.data, *stored(collector))


def test_parity_table_covers_every_route() -> None:
    paths = {c.path.rstrip("/") for c in CASES}
    for route in (
        "/v1/track",
        "/v1/t",
        "/v1/identify",
        "/v1/page",
        "/v1/screen",
        "/v1/group",
        "/v1/alias",
        "/v1/batch",
        "/v1/import",
        "/v1/b",
        "/v1/pixel/track",
        "/v1/webhook",
        "/v1/w",
    ):
        assert route in paths
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_asgi_and_wsgi_answer_and_store_identically(case: Case) -> None:
    from_asgi = through_asgi(case)
    from_wsgi = through_wsgi(case)

    assert from_asgi.status == case.expect, from_asgi.body
    assert from_wsgi.status == from_asgi.status, from_wsgi.body
    assert from_wsgi.headers == from_asgi.headers
    if case.method != "HEAD":
        assert from_wsgi.body == from_asgi.body
    assert from_wsgi.events == from_asgi.events
    assert from_wsgi.rejections == from_asgi.rejections
    assert ("content-length", str(len(from_wsgi.body))) in from_asgi.headers
    left = {name for name in ("events", "rejections") if getattr(from_asgi, name)}
    assert left == case.leaves()
    if case.name == "batch-duplicate-inside":
        assert [r["reason"] for r in from_asgi.rejections] == ["duplicate_message_id"]
    if from_asgi.events:
        # Same clock and the same peer: the server-side enrichment agrees too.
        for event in from_asgi.events:
            payload = json.loads(event["payload"])
            assert payload["receivedAt"] == "2023-11-14T22:13:20.000Z"
            assert payload["context"]["ip"] in (PEER, "198.51.100.23", "192.0.2.1")
