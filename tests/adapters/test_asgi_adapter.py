"""The ASGI adapter: CollectorMiddleware in front of a Starlette app, and collector_app.

Most tests go through Starlette's TestClient; the ones about *how* the body is read
(or not read) drive the middleware with a hand-built scope and a recording receive.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from fp_collect import Collector, Source
from fp_collect.adapters.asgi import CollectorMiddleware, collector_app
from fp_collect.store.memory import MemoryStore

KEY = "wk_asgi_test"
SOURCE = Source(write_key=KEY, id="src_asgi")
SHOP = "https://shop.example"
LOCKED_KEY = "wk_asgi_locked"
LOCKED = Source(write_key=LOCKED_KEY, id="src_locked", allowed_origins=(SHOP,))
PEER = ("203.0.113.9", 40000)


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def track_body(message_id: str = "m-1", **extra: Any) -> dict[str, Any]:
    return {
        "userId": "u-1",
        "event": "Order Completed",
        "properties": {"total": 42},
        "messageId": message_id,
        **extra,
    }


class ClosingStore(MemoryStore):
    """A memory store that counts close() calls."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def make_collector(*sources: Source, prefix: str = "/collect", **options: Any) -> Collector:
    return Collector(sources=sources or (SOURCE,), storage="memory://", prefix=prefix, **options)


async def _home(request: StarletteRequest) -> PlainTextResponse:
    return PlainTextResponse("home")


async def _echo(request: StarletteRequest) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"length": len(body), "body": body.decode()})


async def _host_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(f"host socket at {websocket.url.path}")
    await websocket.close()


def host_app(collector: Collector, **starlette_options: Any) -> Starlette:
    app = Starlette(
        routes=[
            Route("/", _home),
            Route("/echo", _echo, methods=["POST"]),
            WebSocketRoute("/ws", _host_socket),
            # Same path as a collection route: a websocket there is the host's business.
            WebSocketRoute("/collect/v1/track", _host_socket),
        ],
        **starlette_options,
    )
    app.add_middleware(CollectorMiddleware, collector=collector)
    return app


# -- hand-built ASGI ---------------------------------------------------------------------


def http_scope(
    method: str,
    path: str,
    headers: Iterable[tuple[str, str]] = (),
    *,
    root_path: str = "",
    query: bytes = b"",
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": query,
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": PEER,
        "server": ("127.0.0.1", 8000),
    }


class Wire:
    """A scripted receive() that records how often it was called, and a send()."""

    def __init__(self, messages: Iterable[dict[str, Any]] = (), *, forbid: bool = False):
        self.pending = list(messages)
        self.forbid = forbid
        self.receive_calls = 0
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        self.receive_calls += 1
        if self.forbid:
            raise AssertionError("receive() must not be called")
        if self.pending:
            return self.pending.pop(0)
        # Nothing more to give: what a server sends once the client is gone.
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        starts = [m for m in self.sent if m["type"] == "http.response.start"]
        assert len(starts) == 1, self.sent
        return int(starts[0]["status"])

    @property
    def headers(self) -> dict[str, str]:
        (start,) = [m for m in self.sent if m["type"] == "http.response.start"]
        return {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")

    def json(self) -> Any:
        return json.loads(self.body)


def run(app: Any, scope: dict[str, Any], wire: Wire) -> Wire:
    asyncio.run(app(scope, wire.receive, wire.send))
    return wire


def chunks(data: bytes, size: int) -> list[dict[str, Any]]:
    parts = [data[i : i + size] for i in range(0, len(data), size)]
    return [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]


# -- host app untouched -------------------------------------------------------------------


def test_asgi_host_routes_untouched() -> None:
    collector = make_collector()
    client = TestClient(host_app(collector), client=PEER)

    assert client.get("/").text == "home"
    body = json.dumps(track_body()).encode()
    echoed = client.post("/echo", content=body, headers={"content-type": "application/json"})
    assert echoed.status_code == 200
    assert echoed.json() == {"length": len(body), "body": body.decode()}
    # Collection paths live under the prefix only: /v1/track itself is the host's.
    outside = client.post("/v1/track", content=body, headers={"authorization": basic(KEY)})
    assert outside.status_code == 404
    assert outside.text == "Not Found"
    assert list(collector.store.events()) == []
    assert list(collector.store.rejections()) == []


@pytest.mark.parametrize("path", ["/other", "/v1/track", "/collect", "/collect/v2/track"])
def test_asgi_pass_through_does_not_read_the_body(path: str) -> None:
    calls: list[str] = []

    async def host(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = CollectorMiddleware(host, collector=make_collector())
    wire = run(middleware, http_scope("POST", path), Wire(forbid=True))

    assert calls == [path]
    assert wire.receive_calls == 0
    assert wire.status == 204


def test_asgi_pass_through_host_reads_every_chunk() -> None:
    received: list[bytes] = []

    async def host(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            received.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"".join(received)})

    payload = b"x" * 50_000  # far above every collection limit: not ours to judge
    middleware = CollectorMiddleware(host, collector=make_collector())
    wire = run(middleware, http_scope("POST", "/upload"), Wire(chunks(payload, 7_000)))

    assert wire.status == 200
    assert wire.body == payload
    assert len(received) == 8


# -- collection ----------------------------------------------------------------------------


def test_asgi_track_single_is_stored() -> None:
    collector = make_collector()
    client = TestClient(host_app(collector), client=PEER)

    response = client.post(
        "/collect/v1/track",
        json=track_body("m-track"),
        headers={"authorization": basic(KEY), "user-agent": "asgi-test/1"},
    )

    assert response.status_code == 200
    assert response.json() == {"success": True}
    assert response.headers["content-type"] == "application/json"
    (event,) = collector.store.events()
    assert (event.source_id, event.type, event.name) == ("src_asgi", "track", "Order Completed")
    assert (event.message_id, event.user_id) == ("m-track", "u-1")
    payload = json.loads(event.payload)
    assert payload["properties"] == {"total": 42}
    assert payload["context"]["ip"] == PEER[0]
    assert payload["context"]["userAgent"] == "asgi-test/1"
    assert "writeKey" not in payload
    assert list(collector.store.rejections()) == []


def test_asgi_middleware_built_from_options() -> None:
    """The documented one-liner: add_middleware with keyword options."""
    app = Starlette(routes=[Route("/", _home)])
    app.add_middleware(
        CollectorMiddleware,
        sources=[SOURCE],
        storage="memory://",
        prefix="/collect",
    )
    client = TestClient(app, client=PEER)

    response = client.post(
        "/collect/v1/t", json=track_body("m-opts"), headers={"authorization": basic(KEY)}
    )
    assert response.status_code == 200
    assert response.json() == {"success": True}
    assert client.get("/").text == "home"

    layer: Any = app.middleware_stack
    for _ in range(20):
        if isinstance(layer, CollectorMiddleware):
            break
        layer = layer.app
    assert isinstance(layer, CollectorMiddleware)
    assert [e.message_id for e in layer.collector.store.events()] == ["m-opts"]


def test_asgi_body_split_over_several_messages_is_assembled() -> None:
    collector = make_collector()
    middleware = CollectorMiddleware(None, collector=collector)
    body = json.dumps(track_body("m-chunked")).encode()
    headers = [("authorization", basic(KEY)), ("content-type", "application/json")]

    wire = run(middleware, http_scope("POST", "/collect/v1/track", headers), Wire(chunks(body, 9)))

    assert wire.status == 200, wire.body
    assert wire.json() == {"success": True}
    assert wire.receive_calls == len(chunks(body, 9))
    assert [e.message_id for e in collector.store.events()] == ["m-chunked"]


def test_asgi_a_body_cut_short_by_a_disconnect_is_not_processed() -> None:
    """The client left before its body ended; what came parses as a whole event. Nobody
    is left to answer, and its retry would store the event a second time."""
    collector = make_collector()
    middleware = CollectorMiddleware(None, collector=collector)
    whole_event = json.dumps(track_body("m-cut")).encode()
    headers = [("authorization", basic(KEY)), ("content-type", "application/json")]
    cut = Wire([{"type": "http.request", "body": whole_event, "more_body": True}])

    wire = run(middleware, http_scope("POST", "/collect/v1/track", headers), cut)

    # An answer all the same (the server drops it): middleware around may insist on one.
    assert wire.status == 400 and wire.json()["code"] == "invalid_body"
    assert list(collector.store.events()) == []
    assert list(collector.store.rejections()) == []


def test_asgi_a_disconnect_mid_body_under_http_middleware_raises_nothing() -> None:
    """Starlette's ``BaseHTTPMiddleware`` raises "No response returned." for an app that
    answers nothing; a client leaving mid-upload must not cause that."""
    collector = make_collector()
    app = host_app(collector)

    async def passthrough(request: StarletteRequest, call_next: Any) -> Any:
        return await call_next(request)

    app.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)

    whole_event = json.dumps(track_body("m-cut")).encode()
    headers = [("authorization", basic(KEY)), ("content-type", "application/json")]
    cut = Wire([{"type": "http.request", "body": whole_event, "more_body": True}])

    wire = run(app, http_scope("POST", "/collect/v1/track", headers), cut)

    assert wire.status == 400
    assert list(collector.store.events()) == []


@pytest.mark.parametrize(
    ("path", "declared"),
    [("/collect/v1/track", 15 * 1024 + 1), ("/collect/v1/batch", 500 * 1024 + 1)],
)
def test_asgi_413_from_content_length_without_receive(path: str, declared: int) -> None:
    collector = make_collector()
    middleware = CollectorMiddleware(None, collector=collector)
    headers = [
        ("authorization", basic(KEY)),
        ("content-type", "application/json"),
        ("content-length", str(declared)),
    ]

    wire = run(middleware, http_scope("POST", path, headers), Wire(forbid=True))

    assert wire.receive_calls == 0
    assert wire.status == 413
    assert wire.headers["content-type"] == "application/json"
    assert wire.headers["content-length"] == str(len(wire.body))
    answer = wire.json()
    assert answer["code"] == "payload_too_large"
    if path.endswith("batch"):
        assert answer["Success"] is False
    assert [r.reason for r in collector.store.rejections()] == ["payload_too_large"]
    assert list(collector.store.events()) == []


def test_asgi_413_for_chunked_body_over_the_limit_stops_reading() -> None:
    collector = make_collector()
    middleware = CollectorMiddleware(None, collector=collector)
    # No content-length: the body arrives as 10 messages of 4 KiB, 40 KiB in all.
    messages = chunks(b"{" + b" " * (40 * 1024 - 2) + b"}", 4096)
    assert len(messages) == 10

    wire = run(
        middleware,
        http_scope("POST", "/collect/v1/track", [("authorization", basic(KEY))]),
        Wire(messages),
    )

    assert wire.status == 413
    assert wire.json()["code"] == "payload_too_large"
    # 15 KiB is passed during the 4th message; nothing after it is read.
    assert wire.receive_calls == 4
    assert [r.reason for r in collector.store.rejections()] == ["payload_too_large"]


def test_asgi_413_for_chunked_batch_over_the_limit() -> None:
    collector = make_collector()
    middleware = CollectorMiddleware(None, collector=collector)
    messages = chunks(b"[" + b"0," * (300 * 1024) + b"0]", 64 * 1024)

    wire = run(
        middleware,
        http_scope("POST", "/collect/v1/batch", [("authorization", basic(KEY))]),
        Wire(messages),
    )

    assert wire.status == 413
    answer = wire.json()
    assert answer["Success"] is False
    assert answer["Errors"][0]["Details"] == "HTTP request too large"
    assert wire.receive_calls < len(messages)


def test_asgi_websocket_scope_passes_through() -> None:
    client = TestClient(host_app(make_collector()))
    with client.websocket_connect("/collect/v1/track") as ws:
        assert ws.receive_text() == "host socket at /collect/v1/track"
    with client.websocket_connect("/ws") as ws:
        assert ws.receive_text() == "host socket at /ws"


def test_asgi_lifespan_passes_through_and_closes_the_store_after_shutdown() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append(f"shutdown, store closed {store.closed} times")

    store = ClosingStore()
    collector = Collector(sources=[SOURCE], store=store, prefix="/collect")
    with TestClient(host_app(collector, lifespan=lifespan)) as client:
        assert events == ["startup"]
        response = client.post(
            "/collect/v1/track", json=track_body(), headers={"authorization": basic(KEY)}
        )
        assert response.status_code == 200
        assert store.closed == 0
    # The host app finished its own shutdown before the store was flushed and closed.
    assert events == ["startup", "shutdown, store closed 0 times"]
    assert store.closed == 1


# -- standalone collector_app ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/"), ("POST", "/nope"), ("GET", "/v1"), ("POST", "/v2/track"), ("GET", "/x/v1/t")],
)
def test_asgi_standalone_unknown_path_is_404_json(method: str, path: str) -> None:
    collector = make_collector(prefix="")
    client = TestClient(collector_app(collector=collector))

    response = client.request(method, path, content=b'{"a":1}')

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == "not_found"
    assert body["Error"] == "Not Found"
    assert list(collector.store.rejections()) == []


def test_asgi_standalone_serves_routes_at_the_root() -> None:
    collector = make_collector(prefix="")
    client = TestClient(collector_app(collector=collector), client=PEER)
    response = client.post("/v1/track", json=track_body(), headers={"authorization": basic(KEY)})
    assert response.status_code == 200
    assert [e.message_id for e in collector.store.events()] == ["m-1"]


def test_asgi_standalone_lifespan_startup_and_shutdown() -> None:
    store = ClosingStore()
    app = collector_app(collector=Collector(sources=[SOURCE], store=store))
    wire = Wire([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    run(app, {"type": "lifespan", "asgi": {"version": "3.0"}}, wire)

    assert [m["type"] for m in wire.sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert store.closed == 1


def test_asgi_standalone_lifespan_through_testclient() -> None:
    store = ClosingStore()
    app = collector_app(collector=Collector(sources=[SOURCE], store=store))
    with TestClient(app) as client:
        assert client.get("/nope").status_code == 404
        assert store.closed == 0
    assert store.closed == 1


def test_asgi_standalone_refuses_websockets_with_a_close() -> None:
    """Nothing to connect to: the handshake must be refused, not left unanswered
    (servers log 'ASGI callable returned without sending handshake')."""
    app = collector_app(collector=make_collector(prefix=""))
    wire = Wire([{"type": "websocket.connect"}])
    scope = {**http_scope("GET", "/v1/track"), "type": "websocket", "subprotocols": []}

    run(app, scope, wire)

    assert [m["type"] for m in wire.sent] == ["websocket.close"]


def test_asgi_collector_app_under_mount_uses_root_path() -> None:
    collector = make_collector(prefix="")
    app = Starlette(routes=[Route("/", _home), Mount("/c", app=collector_app(collector=collector))])
    client = TestClient(app, client=PEER)

    response = client.post(
        "/c/v1/track", json=track_body("m-mounted"), headers={"authorization": basic(KEY)}
    )
    assert response.status_code == 200
    assert response.json() == {"success": True}
    slash = client.post(
        "/c/v1/track/", json=track_body("m-slash"), headers={"authorization": basic(KEY)}
    )
    assert slash.status_code == 200
    assert client.get("/").text == "home"
    # Outside the mount the collector is not consulted at all.
    assert client.post("/v1/track", json=track_body("m-outside")).text == "Not Found"
    # Inside the mount, an unknown path is the collector's JSON 404.
    inside = client.get("/c/v1/nothing")
    assert inside.status_code == 404
    assert inside.json()["code"] == "not_found"
    assert [e.message_id for e in collector.store.events()] == ["m-mounted", "m-slash"]


def test_asgi_collector_app_under_mount_records_the_relative_endpoint() -> None:
    collector = make_collector(prefix="")
    app = Starlette(routes=[Mount("/c", app=collector_app(collector=collector))])
    client = TestClient(app)

    response = client.post("/c/v1/track", json=track_body(), headers={"authorization": basic("x")})

    assert response.status_code == 400
    assert response.json()["code"] == "invalid_write_key"
    (rejection,) = collector.store.rejections()
    assert rejection.endpoint == "/v1/track"


# -- CORS ------------------------------------------------------------------------------------


def cors_client(collector: Collector) -> TestClient:
    return TestClient(host_app(collector), client=PEER)


def test_asgi_cors_preflight_then_credentialed_post() -> None:
    collector = make_collector(LOCKED)
    client = cors_client(collector)

    preflight = client.options(
        "/collect/v1/track",
        headers={
            "origin": SHOP,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, authorization",
        },
    )
    assert preflight.status_code == 204
    assert preflight.content == b""
    assert preflight.headers["access-control-allow-origin"] == SHOP
    assert preflight.headers["access-control-allow-credentials"] == "true"
    assert preflight.headers["access-control-allow-headers"] == "content-type, authorization"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert int(preflight.headers["access-control-max-age"]) > 0
    assert "Origin" in preflight.headers["vary"]
    assert list(collector.store.events()) == []
    assert list(collector.store.rejections()) == []

    post = client.post(
        "/collect/v1/track",
        content=json.dumps(track_body("m-cors")),
        headers={"origin": SHOP, "content-type": "text/plain", "authorization": basic(LOCKED_KEY)},
    )
    assert post.status_code == 200
    assert post.json() == {"success": True}
    assert post.headers["access-control-allow-origin"] == SHOP
    assert post.headers["access-control-allow-credentials"] == "true"
    (event,) = collector.store.events()
    assert (event.source_id, event.message_id) == ("src_locked", "m-cors")


@pytest.mark.parametrize(
    ("origin", "echoed"),
    [
        ("https://anyone.example", True),
        ("null", False),  # sandboxed frames, file: pages
        ("https://a.example, https://b.example", False),
        ("https://a.example https://b.example", False),
    ],
)
def test_asgi_cors_any_origin_echoes_only_a_real_single_origin(origin: str, echoed: bool) -> None:
    """A source allowing "*" has the caller's origin echoed with credentials: only ever
    one real origin, never "null" or a list."""
    client = cors_client(make_collector(SOURCE))
    preflight = client.options(
        "/collect/v1/track", headers={"origin": origin, "access-control-request-method": "POST"}
    )
    assert preflight.status_code == (204 if echoed else 403)
    post = client.post(
        "/collect/v1/track",
        content=json.dumps(track_body("m-any")),
        headers={"origin": origin, "content-type": "text/plain", "authorization": basic(KEY)},
    )
    assert post.status_code == 200
    assert post.headers.get("access-control-allow-origin") == (origin if echoed else None)


def test_asgi_cors_origin_not_allowed_for_the_source_is_403_json() -> None:
    collector = make_collector(LOCKED)
    client = cors_client(collector)
    evil = "https://evil.example"

    response = client.post(
        "/collect/v1/track",
        json=track_body("m-evil"),
        headers={"origin": evil, "authorization": basic(LOCKED_KEY)},
    )

    assert response.status_code == 403
    assert response.headers["content-type"] == "application/json"
    assert response.json()["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in response.headers
    assert list(collector.store.events()) == []
    assert [(r.reason, r.source_id) for r in collector.store.rejections()] == [
        ("origin_not_allowed", "src_locked")
    ]

    preflight = client.options(
        "/collect/v1/track",
        headers={"origin": evil, "access-control-request-method": "POST"},
    )
    assert preflight.status_code == 403
    assert preflight.json()["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in preflight.headers


def test_asgi_cors_origin_not_allowed_for_a_batchs_source_is_403_json() -> None:
    """As on a single call: the source the request authenticates as refuses it whole."""
    collector = make_collector(LOCKED)
    client = cors_client(collector)

    response = client.post(
        "/collect/v1/batch",
        json={"batch": [track_body("m-a"), track_body("m-b")]},
        headers={"origin": "https://evil.example", "authorization": basic(LOCKED_KEY)},
    )

    assert response.status_code == 403
    assert response.json()["code"] == "origin_not_allowed"
    assert list(collector.store.events()) == []
    assert [(r.reason, r.source_id) for r in collector.store.rejections()] == [
        ("origin_not_allowed", "src_locked")
    ]


def test_asgi_cors_origin_not_allowed_for_one_items_source_refuses_that_item() -> None:
    collector = make_collector(LOCKED, Source(write_key=KEY, id="src_open"))
    client = cors_client(collector)

    response = client.post(
        "/collect/v1/batch",
        json={
            "batch": [
                {**track_body("m-locked"), "type": "track", "writeKey": LOCKED_KEY},
                {**track_body("m-open"), "type": "track", "writeKey": KEY},
            ]
        },
        headers={"origin": "https://evil.example"},
    )

    assert response.status_code == 207
    assert [e["code"] for e in response.json()["Errors"]] == ["origin_not_allowed"]
    assert [e.message_id for e in collector.store.events()] == ["m-open"]
    assert [(r.reason, r.message_id) for r in collector.store.rejections()] == [
        ("origin_not_allowed", "m-locked")
    ]


def test_asgi_request_without_origin_is_never_refused_on_origin() -> None:
    collector = make_collector(LOCKED)
    response = cors_client(collector).post(
        "/collect/v1/track", json=track_body(), headers={"authorization": basic(LOCKED_KEY)}
    )
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
