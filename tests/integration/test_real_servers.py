"""The adapters under real servers (uvicorn, werkzeug) and real sockets, SQLite store.

Fixtures (``server``, ``servers``) live in this folder's conftest.py.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pytest

from fp_collect.store import open_store

AUTH = "Basic d2tfaW50ZWdyYXRpb246"  # base64("wk_integration:")
TRACK_LIMIT = 15 * 1024

pytestmark = pytest.mark.timeout(60)


def track(message_id: str, **extra: Any) -> dict[str, Any]:
    return {"userId": "u-1", "event": "Signed Up", "messageId": message_id, **extra}


def connect(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=10)


def exchange(
    port: int,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
    *,
    chunked: bool = False,
) -> tuple[int, dict[str, str], bytes]:
    conn = connect(port)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def post_json(port: int, path: str, value: object, **headers: str) -> tuple[int, Any]:
    all_headers = {"content-type": "application/json", "authorization": AUTH, **headers}
    status, _headers, data = exchange(port, "POST", path, json.dumps(value).encode(), all_headers)
    return status, json.loads(data)


def test_real_server_track_is_committed_before_the_answer(server: Any) -> None:
    status, body = post_json(server.port, "/collect/v1/track", track("m-real", properties={"a": 1}))

    assert (status, body) == (200, {"success": True})
    # Durable before success: a separate store sees it at once, with no flush or close.
    (event,) = server.events()
    assert (event.message_id, event.type, event.name) == ("m-real", "track", "Signed Up")
    payload = json.loads(event.payload)
    assert payload["properties"] == {"a": 1}
    assert payload["context"]["ip"] == "127.0.0.1"
    assert server.rejections() == []


def test_real_server_host_routes_untouched(server: Any) -> None:
    assert exchange(server.port, "GET", "/")[::2] == (200, b"home")
    body = b"x" * 100_000  # far above the collection limits: none of the collector's business
    status, _headers, echoed = exchange(
        server.port, "POST", "/echo", body, {"content-type": "application/json"}
    )
    assert (status, echoed) == (200, body)
    assert server.events() == []
    assert server.rejections() == []


def test_real_server_batch_with_gzip(server: Any) -> None:
    batch = {"batch": [{**track(f"m-{i}"), "type": "track"} for i in range(50)]}
    status, _headers, data = exchange(
        server.port,
        "POST",
        "/collect/v1/batch",
        gzip.compress(json.dumps(batch).encode()),
        {"content-type": "application/json", "content-encoding": "gzip", "authorization": AUTH},
    )
    assert (status, json.loads(data)) == (200, {"success": True})
    assert [e.message_id for e in server.events()] == [f"m-{i}" for i in range(50)]


def test_real_server_chunked_body_under_the_limit(server: Any) -> None:
    raw = json.dumps(track("m-chunked")).encode()
    parts = [raw[i : i + 7] for i in range(0, len(raw), 7)]

    status, _headers, data = exchange(
        server.port,
        "POST",
        "/collect/v1/track",
        iter(parts),
        {"content-type": "application/json", "authorization": AUTH},
        chunked=True,
    )

    assert status == 200, data
    assert [e.message_id for e in server.events()] == ["m-chunked"]


def test_real_server_chunked_body_over_the_limit_is_413(server: Any) -> None:
    # Valid JSON followed by padding: cut at the limit it would still parse.
    raw = json.dumps(track("m-huge")).encode() + b" " * (TRACK_LIMIT + 10_000)
    parts = [raw[i : i + 4096] for i in range(0, len(raw), 4096)]

    status, _headers, data = exchange(
        server.port,
        "POST",
        "/collect/v1/track",
        iter(parts),
        {"content-type": "application/json", "authorization": AUTH},
        chunked=True,
    )

    assert status == 413, data
    assert json.loads(data)["code"] == "payload_too_large"
    assert server.events() == []
    assert [r.reason for r in server.rejections()] == ["payload_too_large"]


def test_real_server_content_length_over_the_limit_is_413(server: Any) -> None:
    body = json.dumps(track("m-big", properties={"pad": "x" * 20_000})).encode()
    status, headers, data = exchange(
        server.port,
        "POST",
        "/collect/v1/track",
        body,
        {"content-type": "application/json", "authorization": AUTH},
    )
    assert status == 413
    assert headers["content-type"] == "application/json"
    assert json.loads(data)["code"] == "payload_too_large"
    # The server is fine afterwards.
    assert post_json(server.port, "/collect/v1/t", track("m-after")) == (200, {"success": True})
    assert [e.message_id for e in server.events()] == ["m-after"]


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes] | None:
    """One HTTP/1.1 response with a Content-Length from ``sock``, or None if closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
        assert len(data) < 1_000_000
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        rest += chunk
    return status, headers, rest[:length]


def _drain(sock: socket.socket) -> bytes:
    """Everything the server still sends until it closes (bounded)."""
    received = b""
    for _ in range(100):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return received


def test_real_server_unread_413_body_does_not_desync_keep_alive(server: Any) -> None:
    """The 413 is answered without reading the body. The body bytes the client still
    sends must never be parsed as a request of their own on the same connection."""
    auth = AUTH.encode()
    smuggled = (
        b"POST /collect/v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth
        + b"\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n"
        + json.dumps(track("m-smuggled")).encode().ljust(64)
    )  # fmt: skip
    body = smuggled.ljust(TRACK_LIMIT + 1000, b" ")
    first = (
        b"POST /collect/v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(first)
        answer = _read_response(sock)
        assert answer is not None
        status, headers, _body = answer
        assert status == 413
        if headers.get("connection", "").lower() == "close":
            # werkzeug: the server said it will not reuse the connection.
            sock.shutdown(socket.SHUT_WR)
            assert _drain(sock) == b""
        else:
            # uvicorn keeps the connection: the next request must be the real one.
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            follow_up = _read_response(sock)
            assert follow_up is None or follow_up[::2] == (200, b"home")
    assert server.events() == []


def test_real_server_concurrent_requests_all_committed(server: Any) -> None:
    statuses: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            for i in range(5):
                status, _ = post_json(server.port, "/collect/v1/track", track(f"m-{n}-{i}"))
                with lock:
                    statuses.append(status)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert statuses == [200] * 40
    ids = Counter(e.message_id for e in server.events())
    assert ids == Counter({f"m-{n}-{i}": 1 for n in range(8) for i in range(5)})
    assert server.rejections() == []


def test_real_server_events_survive_shutdown(servers: Any) -> None:
    running = servers.start("asgi")
    assert (
        post_json(running.port, "/collect/v1/page", {**track("m-page"), "name": "Home"})[0] == 200
    )
    running.stop()  # uvicorn lifespan shutdown closes the collector and its store
    with open_store(running.storage) as store:
        assert [(e.message_id, e.type, e.name) for e in store.events()] == [
            ("m-page", "page", "Home")
        ]


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_real_server_stop_leaves_no_thread_behind(servers: Any, kind: str) -> None:
    """Stopping the server and closing the collector ends every thread they started
    (server loop, request threads, the store's writer)."""
    before = set(threading.enumerate())
    running = servers.start(kind)
    assert post_json(running.port, "/collect/v1/track", track("m-threads"))[0] == 200
    running.stop()
    lingering = [t for t in threading.enumerate() if t not in before]
    for thread in lingering:
        thread.join(5)
    assert [t.name for t in lingering if t.is_alive()] == []
