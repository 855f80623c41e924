"""The WSGI adapter: init_app on Flask, and CollectorMiddleware over a plain WSGI app."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

import pytest
from flask import Flask, request
from werkzeug.exceptions import ClientDisconnected
from werkzeug.test import Client, EnvironBuilder

from fp_collect import Collector, Source
from fp_collect.adapters.wsgi import CollectorMiddleware, init_app

KEY = "wk_wsgi_test"
SOURCE = Source(write_key=KEY, id="src_wsgi")
SHOP = "https://shop.example"
LOCKED_KEY = "wk_wsgi_locked"
LOCKED = Source(write_key=LOCKED_KEY, id="src_locked", allowed_origins=(SHOP,))
PEER = "203.0.113.10"
PIXEL_MAGIC = b"GIF89a"


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def track_body(message_id: str = "m-1", **extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": "u-1",
        "event": "Order Completed",
        "properties": {"total": 42},
        "messageId": message_id,
        **extra,
    }


def flask_app(*sources: Source) -> tuple[Flask, Collector]:
    app = Flask(__name__)

    @app.get("/")
    def home() -> str:
        return "home"

    @app.post("/echo")
    def echo() -> dict[str, Any]:
        data = request.get_data()
        return {"length": len(data), "body": data.decode()}

    collector = init_app(app, sources=sources or (SOURCE,), storage="memory://", prefix="/collect")
    return app, collector


class PeerClient(Client):
    """werkzeug's test Client, every request coming from ``PEER``."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("environ_base", {"REMOTE_ADDR": PEER})
        return super().open(*args, **kwargs)


def flask_client(app: Flask) -> Client:
    return PeerClient(app)


def plain_host(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """A bare WSGI app that echoes its path and body."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    answer = json.dumps({"path": environ["PATH_INFO"], "body": body.decode()}).encode()
    start_response("200 OK", [("content-type", "application/json")])
    return [answer]


def plain_app(**options: Any) -> CollectorMiddleware:
    options.setdefault("sources", [SOURCE])
    return CollectorMiddleware(plain_host, storage="memory://", prefix="/collect", **options)


class SpyStream(io.BytesIO):
    """A wsgi.input that counts how many bytes were read from it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0
        self.calls = 0

    def read(self, size: int | None = -1) -> bytes:
        self.calls += 1
        data = super().read(size)
        self.bytes_read += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        self.calls += 1
        count = super().readinto(buffer)
        self.bytes_read += count
        return count

    def readline(self, size: int | None = -1) -> bytes:
        self.calls += 1
        data = super().readline(size)
        self.bytes_read += len(data)
        return data


def call(app: Any, environ: dict[str, Any]) -> tuple[str, dict[str, str], bytes]:
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured["status"] = status
        captured["headers"] = {k.lower(): v for k, v in headers}
        return lambda _data: None

    body = b"".join(app(environ, start_response))
    return captured["status"], captured["headers"], body


def environ_for(
    path: str,
    *,
    stream: io.BytesIO,
    content_length: int | None,
    headers: Iterable[tuple[str, str]] = (),
    terminated: bool = False,
) -> dict[str, Any]:
    environ = EnvironBuilder(
        path=path, method="POST", headers=list(headers), environ_base={"REMOTE_ADDR": PEER}
    ).get_environ()
    environ["wsgi.input"] = stream
    environ.pop("CONTENT_LENGTH", None)
    if content_length is not None:
        environ["CONTENT_LENGTH"] = str(content_length)
    if terminated:
        environ["wsgi.input_terminated"] = True
    return environ


# -- Flask: init_app ---------------------------------------------------------------------


def test_wsgi_init_app_registers_the_collector() -> None:
    app, collector = flask_app()
    assert isinstance(collector, Collector)
    assert app.extensions["fp_collect"] is collector
    assert isinstance(app.wsgi_app, CollectorMiddleware)
    assert app.wsgi_app.collector is collector


def test_wsgi_flask_host_routes_untouched_and_read_their_own_body() -> None:
    app, collector = flask_app()
    client = flask_client(app)
    body = json.dumps(track_body()).encode() * 100  # 8 KB+, and not JSON as a whole

    assert client.get("/").text == "home"
    echoed = client.post("/echo", data=body, headers={"content-type": "application/json"})
    assert echoed.status_code == 200
    assert echoed.json == {"length": len(body), "body": body.decode()}
    # Without the prefix the path belongs to the host app (Flask's 404).
    outside = client.post("/v1/track", data=body, headers={"authorization": basic(KEY)})
    assert outside.status_code == 404
    assert "text/html" in outside.headers["content-type"]
    assert list(collector.store.events()) == []
    assert list(collector.store.rejections()) == []


def test_wsgi_flask_track_single_is_stored() -> None:
    app, collector = flask_app()
    response = flask_client(app).post(
        "/collect/v1/track",
        json=track_body("m-track"),
        headers={"authorization": basic(KEY), "user-agent": "wsgi-test/1"},
    )

    assert response.status_code == 200
    assert response.json == {"success": True}
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-length"] == str(len(response.data))
    (event,) = collector.store.events()
    assert (event.source_id, event.type, event.name) == ("src_wsgi", "track", "Order Completed")
    assert (event.message_id, event.user_id) == ("m-track", "u-1")
    payload = json.loads(event.payload)
    assert payload["properties"] == {"total": 42}
    assert payload["context"]["ip"] == PEER
    assert payload["context"]["userAgent"] == "wsgi-test/1"
    assert list(collector.store.rejections()) == []


def test_wsgi_flask_pixel_get() -> None:
    app, collector = flask_app()
    message = {**track_body("m-pixel"), "writeKey": KEY}
    data = base64.b64encode(json.dumps(message).encode()).decode()

    response = flask_client(app).get("/collect/v1/pixel/track", query_string={"data": data})

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/gif"
    assert response.data.startswith(PIXEL_MAGIC)
    assert [e.message_id for e in collector.store.events()] == ["m-pixel"]


def test_wsgi_flask_413_over_the_limit_is_recorded() -> None:
    app, collector = flask_app()
    big = json.dumps(track_body(properties={"pad": "x" * 20_000}))

    response = flask_client(app).post(
        "/collect/v1/track",
        data=big,
        headers={"authorization": basic(KEY), "content-type": "application/json"},
    )

    assert response.status_code == 413
    assert response.json is not None
    assert response.json["code"] == "payload_too_large"
    assert list(collector.store.events()) == []
    assert [r.reason for r in collector.store.rejections()] == ["payload_too_large"]


# -- reading the body ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "declared"),
    [("/collect/v1/track", 15 * 1024 + 1), ("/collect/v1/import", 500 * 1024 + 1)],
)
def test_wsgi_413_from_content_length_leaves_the_body_unread(path: str, declared: int) -> None:
    app = plain_app()
    stream = SpyStream(b"{" * declared)
    environ = environ_for(
        path, stream=stream, content_length=declared, headers=[("Authorization", basic(KEY))]
    )

    status, headers, body = call(app, environ)

    assert status == "413 Request Entity Too Large"
    assert headers["content-length"] == str(len(body))
    assert json.loads(body)["code"] == "payload_too_large"
    assert stream.calls == 0
    assert stream.bytes_read == 0
    assert [r.reason for r in app.collector.store.rejections()] == ["payload_too_large"]


def test_wsgi_terminated_stream_over_the_limit_is_413_and_reading_stops() -> None:
    """A server that de-chunks (wsgi.input_terminated, no Content-Length)."""
    app = plain_app()
    stream = SpyStream(b" " * 200_000)
    environ = environ_for(
        "/collect/v1/track",
        stream=stream,
        content_length=None,
        terminated=True,
        headers=[("Authorization", basic(KEY))],
    )

    status, _headers, body = call(app, environ)

    assert status.startswith("413")
    assert json.loads(body)["code"] == "payload_too_large"
    assert stream.bytes_read <= 15 * 1024 + 1


def test_wsgi_terminated_stream_under_the_limit_is_read_whole() -> None:
    app = plain_app()
    payload = json.dumps(track_body("m-terminated")).encode()
    environ = environ_for(
        "/collect/v1/track",
        stream=SpyStream(payload),
        content_length=None,
        terminated=True,
        headers=[("Authorization", basic(KEY)), ("Content-Type", "application/json")],
    )

    status, _headers, body = call(app, environ)

    assert status == "200 OK", body
    assert [e.message_id for e in app.collector.store.events()] == ["m-terminated"]


def test_wsgi_truncated_body_is_answered_not_raised() -> None:
    """The client announced more bytes than it sent, then went away. That is the
    client's problem: the adapter must answer 400 (and may record it), not let
    werkzeug's ClientDisconnected escape into the server as a 500."""
    app = plain_app()
    environ = environ_for(
        "/collect/v1/track",
        stream=SpyStream(b'{"userId": "u-1", "ev'),
        content_length=500,
        headers=[("Authorization", basic(KEY)), ("Content-Type", "application/json")],
    )

    status, _headers, body = call(app, environ)

    assert status.startswith("400"), body
    assert list(app.collector.store.events()) == []


class FailingStream(io.BytesIO):
    """A wsgi.input that fails as a server's does: werkzeug's dechunker on a broken chunk
    header, or a client gone in the middle of its body."""

    def __init__(self, error: Exception) -> None:
        super().__init__(b"")
        self.error = error

    def read(self, size: int | None = -1) -> bytes:
        raise self.error

    def readinto(self, buffer: Any) -> int:
        raise self.error


def test_wsgi_a_body_cut_short_is_not_processed_even_when_it_parses() -> None:
    """Content-Length promised more than arrived: the client left, and what came may be a
    whole event. Storing it would answer nobody; the client's retry would store it again."""
    app = plain_app()
    whole_event = json.dumps(track_body("m-cut")).encode()
    environ = environ_for(
        "/collect/v1/track",
        stream=SpyStream(whole_event),
        content_length=len(whole_event) + 100,
        headers=[("Authorization", basic(KEY)), ("Content-Type", "application/json")],
    )
    status, headers, body = call(app, environ)
    assert status.startswith("400") and headers["content-type"] == "application/json"
    assert json.loads(body)["code"] == "invalid_body"
    assert list(app.collector.store.events()) == []
    assert list(app.collector.store.rejections()) == []


@pytest.mark.parametrize(
    ("error", "detail"),
    [
        (OSError("Invalid chunk header"), "Invalid chunk header"),
        (ValueError("bad size"), "bad size"),
        (ClientDisconnected(), "the client went away before the body ended"),
    ],
)
def test_wsgi_an_unreadable_body_is_a_json_400_not_a_500(error: Exception, detail: str) -> None:
    app = plain_app()
    environ = environ_for(
        "/collect/v1/batch",
        stream=FailingStream(error),
        content_length=None,
        headers=[("Authorization", basic(KEY)), ("Content-Type", "application/json")],
        terminated=True,
    )
    status, headers, body = call(app, environ)
    assert status.startswith("400") and headers["content-type"] == "application/json"
    answer = json.loads(body)
    assert answer["code"] == "invalid_body" and detail in answer["Details"]
    assert list(app.collector.store.events()) == []


# -- plain WSGI middleware ------------------------------------------------------------------


def test_wsgi_plain_pass_through_keeps_the_body_for_the_host() -> None:
    app = plain_app()
    client = PeerClient(app)
    body = "x" * 40_000  # above every collection limit, and none of our business

    for path in ("/upload", "/v1/track", "/collect", "/collect/v1/nothing"):
        response = client.post(path, data=body, headers={"authorization": basic(KEY)})
        assert response.status_code == 200
        assert response.json == {"path": path, "body": body}
    assert list(app.collector.store.events()) == []
    assert list(app.collector.store.rejections()) == []


def test_wsgi_plain_track_and_batch_are_stored() -> None:
    app = plain_app()
    client = PeerClient(app)

    single = client.post(
        "/collect/v1/t", json=track_body("m-one"), headers={"authorization": basic(KEY)}
    )
    batch = client.post(
        "/collect/v1/batch",
        json={"writeKey": KEY, "batch": [track_body("m-two"), track_body("m-three")]},
    )

    assert single.status_code == 200
    assert batch.status_code == 200
    assert batch.json == {"success": True}
    events = list(app.collector.store.events())
    assert [e.message_id for e in events] == ["m-one", "m-two", "m-three"]
    assert {json.loads(e.payload)["context"]["ip"] for e in events} == {PEER}


def test_wsgi_plain_method_not_allowed() -> None:
    app = plain_app()
    response = Client(app).get("/collect/v1/track")
    assert response.status_code == 405
    assert response.headers["allow"] == "OPTIONS, POST"
    assert response.json is not None
    assert response.json["code"] == "method_not_allowed"


# -- CORS ------------------------------------------------------------------------------------


def test_wsgi_cors_preflight_then_credentialed_post() -> None:
    app, collector = flask_app(LOCKED)
    client = flask_client(app)

    preflight = client.options(
        "/collect/v1/track",
        headers={
            "origin": SHOP,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.data == b""
    assert preflight.headers["access-control-allow-origin"] == SHOP
    assert preflight.headers["access-control-allow-credentials"] == "true"
    assert preflight.headers["access-control-allow-headers"] == "content-type"
    assert "POST" in preflight.headers["access-control-allow-methods"]

    post = client.post(
        "/collect/v1/track",
        data=json.dumps({**track_body("m-cors"), "writeKey": LOCKED_KEY}),
        headers={"origin": SHOP, "content-type": "text/plain"},
    )
    assert post.status_code == 200
    assert post.headers["access-control-allow-origin"] == SHOP
    assert post.headers["access-control-allow-credentials"] == "true"
    assert [e.message_id for e in collector.store.events()] == ["m-cors"]


def test_wsgi_cors_origin_not_allowed_is_403_json() -> None:
    app, collector = flask_app(LOCKED)
    client = flask_client(app)

    response = client.post(
        "/collect/v1/track",
        json=track_body("m-evil"),
        headers={"origin": "https://evil.example", "authorization": basic(LOCKED_KEY)},
    )

    assert response.status_code == 403
    assert response.headers["content-type"] == "application/json"
    assert response.json is not None
    assert response.json["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in response.headers
    assert list(collector.store.events()) == []
    assert [r.reason for r in collector.store.rejections()] == ["origin_not_allowed"]


def test_wsgi_adapter_without_werkzeug_names_the_extra_to_install() -> None:
    code = "import sys; sys.modules['werkzeug'] = None; import fp_collect.adapters.wsgi"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "install fp-collect's 'flask' extra" in result.stderr
