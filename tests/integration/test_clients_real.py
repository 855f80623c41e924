"""The real, unmodified Segment-spec SDKs from PyPI against our real servers.

segment-analytics-python and rudder-sdk-python post to ``{host}/v1/batch``; ``host``
carries our ``/collect`` prefix. Every call they make must be stored with the
messageId they generated, and nothing may be rejected. The retry tests lose the answer
to the first batch *after* it was committed: the SDK retries, and dedup must keep
exactly one copy, recording the second delivery as ``duplicate_message_id``.
"""

from __future__ import annotations

import gzip
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from io import BytesIO
from typing import Any

import pytest
from rudderstack.analytics import request as rudder_request
from rudderstack.analytics.client import Client as RudderClient
from segment.analytics import request as segment_request
from segment.analytics.client import Client as SegmentClient

WRITE_KEY = "wk_integration"
SOURCE_ID = "src_integration"
BATCH_PATH = "/collect/v1/batch"

pytestmark = pytest.mark.timeout(60)


# -- the calls every SDK makes --------------------------------------------------------------


def send_everything(client: Any) -> list[dict[str, Any]]:
    """track/identify/page/screen/group/alias; the messages as the SDK built them."""
    calls: list[Callable[[], tuple[bool, dict[str, Any]]]] = [
        lambda: client.track(
            "user-1", "Order Completed", {"revenue": 9.5, "items": ["a", "b"], "ok": True}
        ),
        lambda: client.identify("user-1", {"email": "u1@example.com", "plan": "pro"}),
        lambda: client.page("user-1", "Docs", "Install", {"path": "/install"}),
        lambda: client.screen("user-1", "Settings", "Privacy", {"tab": 2}),
        lambda: client.group("user-1", "group-7", {"name": "ACME", "seats": 12}),
        lambda: client.alias("anon-42", "user-1"),
    ]
    messages = []
    for call in calls:
        queued, message = call()
        assert queued is True
        messages.append(message)
    assert len({m["messageId"] for m in messages}) == len(messages)
    return messages


def assert_all_stored(running: Any, messages: list[dict[str, Any]], *, rudder: bool) -> None:
    events = running.events()
    counts = Counter(e.message_id for e in events)
    assert counts == Counter({m["messageId"]: 1 for m in messages})
    by_id = {e.message_id: e for e in events}
    for message in messages:
        event = by_id[message["messageId"]]
        kind = message["type"]
        assert event.source_id == SOURCE_ID
        assert event.type == kind
        assert event.user_id == "user-1"
        payload = json.loads(event.payload)
        assert payload["type"] == kind
        assert payload["messageId"] == message["messageId"]
        assert payload["context"]["library"]["name"] == "analytics-python"
        assert payload["context"]["ip"] == "127.0.0.1"
        # the SDK's own timestamp is kept as originalTimestamp
        assert payload["originalTimestamp"] == message["timestamp"]
        assert "writeKey" not in payload
        if kind == "track":
            assert event.name == "Order Completed"
            assert payload["properties"] == {"revenue": 9.5, "items": ["a", "b"], "ok": True}
        elif kind == "identify":
            assert event.name is None
            traits = {"email": "u1@example.com", "plan": "pro"}
            if rudder:  # rudder moves identify traits into context.traits
                assert payload["context"]["traits"] == traits
                assert "traits" not in payload
            else:
                assert payload["traits"] == traits
        elif kind == "page":
            assert event.name == "Install"
            assert (payload["category"], payload["properties"]) == ("Docs", {"path": "/install"})
        elif kind == "screen":
            assert event.name == "Privacy"
            assert (payload["category"], payload["properties"]) == ("Settings", {"tab": 2})
        elif kind == "group":
            assert payload["groupId"] == "group-7"
            assert payload["traits"] == {"name": "ACME", "seats": 12}
        else:
            assert kind == "alias"
            assert payload["previousId"] == "anon-42"
        if rudder:
            assert payload["channel"] == "server"
    assert running.rejections() == []


# -- building clients ------------------------------------------------------------------------


class Errors:
    """An on_error callback that keeps what it is given."""

    def __init__(self) -> None:
        self.seen: list[tuple[Exception, list[dict[str, Any]]]] = []

    def __call__(self, error: Exception, batch: list[dict[str, Any]]) -> None:
        self.seen.append((error, batch))


@pytest.fixture
def stop_clients() -> Iterator[list[Any]]:
    """Asynchronous clients registered here are joined (their consumer threads
    stopped) and the SDKs' module-level HTTP sessions dropped after the test."""
    clients: list[Any] = []
    yield clients
    for client in clients:
        client.join()
    segment_request._session.close()
    rudder_request._session.close()


def segment_client(
    running: Any, *, errors: Errors, sync: bool, gzip: bool, upload_interval: float = 0.05
) -> SegmentClient:
    return SegmentClient(
        WRITE_KEY,
        host=running.host,
        sync_mode=sync,
        gzip=gzip,
        on_error=errors,
        max_retries=2,
        timeout=10,
        upload_interval=upload_interval,
        max_total_backoff_duration=20,
    )


def rudder_client(
    running: Any, *, errors: Errors, sync: bool, gzip: bool, upload_interval: float = 0.05
) -> RudderClient:
    return RudderClient(
        WRITE_KEY,
        host=running.host,
        sync_mode=sync,
        gzip=gzip,
        on_error=errors,
        max_retries=2,
        timeout=10,
        upload_interval=upload_interval,
    )


MODES = [
    pytest.param(True, False, id="sync-plain"),
    pytest.param(True, True, id="sync-gzip"),
    pytest.param(False, True, id="async-gzip"),
    pytest.param(False, False, id="async-plain"),
]


@pytest.mark.parametrize(("sync", "gzipped"), MODES)
def test_clients_segment_every_call_is_stored(
    server: Any, stop_clients: list[Any], sync: bool, gzipped: bool
) -> None:
    errors = Errors()
    client = segment_client(server, errors=errors, sync=sync, gzip=gzipped)
    if not sync:
        stop_clients.append(client)

    messages = send_everything(client)
    if not sync:
        client.flush()

    assert errors.seen == []
    assert_all_stored(server, messages, rudder=False)


@pytest.mark.parametrize(("sync", "gzipped"), MODES)
def test_clients_rudder_every_call_is_stored(
    server: Any, stop_clients: list[Any], sync: bool, gzipped: bool
) -> None:
    errors = Errors()
    client = rudder_client(server, errors=errors, sync=sync, gzip=gzipped)
    if not sync:
        stop_clients.append(client)

    messages = send_everything(client)
    if not sync:
        client.flush()

    assert errors.seen == []
    assert_all_stored(server, messages, rudder=True)


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_clients_rudder_takes_a_partial_batch_once_from_a_source_answering_200(
    servers: Any, stop_clients: list[Any], kind: str
) -> None:
    """rudder-sdk-python takes only 200 as success: a 207 would make it send the whole
    batch again. With ``partial_success_status=200`` it is sent once and not reported."""
    running = servers.start(kind, partial_success_status=200)
    errors = Errors()
    # Both calls in one batch: the consumer waits up to a second for more after the first.
    client = rudder_client(running, errors=errors, sync=False, gzip=True, upload_interval=1.0)
    stop_clients.append(client)
    _queued, good = client.track("rudder-user", "Button Clicked", {"n": 1})
    client.group("rudder-user", "", {})  # no groupId: refused
    client.flush()
    assert errors.seen == []
    assert [e.message_id for e in running.events()] == [good["messageId"]]
    assert [r.reason for r in running.rejections()] == ["missing_group_id"]  # one attempt


def test_clients_rudder_default_host_is_not_used(server: Any) -> None:
    """rudder reads TEST_DATA_PLANE_URL (and a .env) at import; an explicit host wins."""
    client = rudder_client(server, errors=Errors(), sync=True, gzip=True)
    assert client.host == server.host
    _queued, message = client.track("user-1", "Ping")
    assert [e.message_id for e in server.events()] == [message["messageId"]]


def test_clients_segment_sync_mode_surfaces_a_refusal(server: Any) -> None:
    """A wrong key is answered 400 with {code, message}: the SDK raises APIError with
    our code, rather than 'unknown'."""
    client = SegmentClient("not-the-key", host=server.host, sync_mode=True, max_retries=0)
    with pytest.raises(segment_request.APIError) as raised:
        client.track("user-1", "Nope")
    assert (raised.value.status, raised.value.code) == (400, "invalid_write_key")
    assert server.events() == []
    assert [r.reason for r in server.rejections()] == ["invalid_write_key"]


# -- lost answers and retries -----------------------------------------------------------------

LOST_BODY = json.dumps({"code": "lost_answer", "message": "the answer was lost"}).encode()
LOST_HEADERS = [("content-type", "application/json"), ("content-length", str(len(LOST_BODY)))]


def message_ids(headers: dict[str, str], body: bytes) -> list[str]:
    if headers.get("content-encoding") == "gzip":
        body = gzip.decompress(body)
    return [m["messageId"] for m in json.loads(body)["batch"]]


class LoseFirstBatchAnswer:
    """ASGI: lets the collector process and commit the first /v1/batch request, then
    throws its answer away and sends a 500 instead (no Retry-After)."""

    def __init__(self, app: Any, *, lose: bool = True) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.armed = lose
        self.batches: list[tuple[dict[str, str], bytes]] = []
        self.swallowed_status: int | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != BATCH_PATH:
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        chunks: list[bytes] = []

        async def recording_receive() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            chunks.append(message.get("body", b""))
            return message

        with self.lock:
            lose, self.armed = self.armed, False
        if not lose:

            async def recording_send(message: dict[str, Any]) -> None:
                # Recorded before the client can see the answer (and finish its flush).
                if message["type"] == "http.response.start":
                    self.batches.append((headers, b"".join(chunks)))
                await send(message)

            await self.app(scope, recording_receive, recording_send)
            return

        swallowed: list[dict[str, Any]] = []

        async def swallow(message: dict[str, Any]) -> None:
            swallowed.append(message)

        await self.app(scope, recording_receive, swallow)
        self.batches.append((headers, b"".join(chunks)))
        self.swallowed_status = swallowed[0]["status"]
        await send(
            {
                "type": "http.response.start",
                "status": 500,
                "headers": [(k.encode(), v.encode()) for k, v in LOST_HEADERS],
            }
        )
        await send({"type": "http.response.body", "body": LOST_BODY})


class LoseFirstBatchAnswerWSGI:
    """The same for WSGI."""

    def __init__(self, app: Any, *, lose: bool = True) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.armed = lose
        self.batches: list[tuple[dict[str, str], bytes]] = []
        self.swallowed_status: int | None = None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != BATCH_PATH:
            return self.app(environ, start_response)  # type: ignore[no-any-return]
        headers = {
            k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")
        }
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = BytesIO(body)
        self.batches.append((headers, body))
        with self.lock:
            lose, self.armed = self.armed, False
        if not lose:
            return self.app(environ, start_response)  # type: ignore[no-any-return]

        captured: list[str] = []

        def swallow(status: str, _headers: Any, _exc_info: Any = None) -> Any:
            captured.append(status)
            return lambda _data: None

        result = self.app(environ, swallow)
        try:
            b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        self.swallowed_status = int(captured[0].split()[0])
        start_response("500 Internal Server Error", LOST_HEADERS)
        return [LOST_BODY]


def lossy(kind: str, made: list[Any], *, lose: bool = True) -> Callable[[Any], Any]:
    """A ``wrap`` for ``servers.start``: puts the right lossy middleware around the app
    and keeps it in ``made`` for the assertions. ``lose=False`` only records."""

    def wrap(app: Any) -> Any:
        middleware = LoseFirstBatchAnswer if kind == "asgi" else LoseFirstBatchAnswerWSGI
        wrapper = middleware(app, lose=lose)
        made.append(wrapper)
        return wrapper

    return wrap


def assert_retried_once_and_deduplicated(
    running: Any, wrapper: Any, messages: list[dict[str, Any]]
) -> None:
    sent = [m["messageId"] for m in messages]
    # The lost request was processed and committed: the collector said 200.
    assert wrapper.swallowed_status == 200
    assert len(wrapper.batches) >= 2
    lost_ids = message_ids(*wrapper.batches[0])
    retried_ids = message_ids(*wrapper.batches[1])
    assert lost_ids and set(lost_ids) <= set(sent)
    assert retried_ids == lost_ids
    # Every messageId stored exactly once ...
    assert Counter(e.message_id for e in running.events()) == Counter(dict.fromkeys(sent, 1))
    # ... and the second delivery of the lost batch recorded as a duplicate.
    rejections = running.rejections()
    assert [r.reason for r in rejections] == ["duplicate_message_id"] * len(lost_ids)
    assert sorted(r.message_id or "" for r in rejections) == sorted(lost_ids)


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
def test_clients_segment_retry_after_lost_answer_is_deduplicated(
    servers: Any, stop_clients: list[Any], kind: str, gzipped: bool
) -> None:
    wrappers: list[Any] = []
    running = servers.start(kind, wrap=lossy(kind, wrappers))
    errors = Errors()
    client = segment_client(running, errors=errors, sync=False, gzip=gzipped)
    stop_clients.append(client)

    messages = send_everything(client)
    client.flush()

    assert errors.seen == []
    (wrapper,) = wrappers
    assert_retried_once_and_deduplicated(running, wrapper, messages)
    # segment numbers its retries
    assert "x-retry-count" not in wrapper.batches[0][0]
    assert wrapper.batches[1][0]["x-retry-count"] == "1"


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_clients_rudder_retry_after_lost_answer_is_deduplicated(
    servers: Any, stop_clients: list[Any], kind: str
) -> None:
    wrappers: list[Any] = []
    running = servers.start(kind, wrap=lossy(kind, wrappers))
    errors = Errors()
    client = rudder_client(running, errors=errors, sync=False, gzip=True)
    stop_clients.append(client)

    messages = send_everything(client)
    client.flush()

    assert errors.seen == []
    (wrapper,) = wrappers
    assert_retried_once_and_deduplicated(running, wrapper, messages)
    # rudder does not number its retries
    assert all("x-retry-count" not in headers for headers, _body in wrapper.batches)


# -- partial success (207) --------------------------------------------------------------------

TOO_LONG_ID = "x" * 300  # over Limits.max_message_id_length: refused by us, not by the SDKs


def send_partly_invalid(client: Any) -> str:
    """One good and one bad track in the same batch; the good one's messageId."""
    _queued, good = client.track("user-1", "Good Event")
    client.track("user-1", "Bad Event", message_id=TOO_LONG_ID)
    client.flush()
    return str(good["messageId"])


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_clients_segment_takes_207_partial_success_as_delivered(
    servers: Any, stop_clients: list[Any], kind: str
) -> None:
    recorders: list[Any] = []
    running = servers.start(kind, wrap=lossy(kind, recorders, lose=False))
    errors = Errors()
    # a long upload interval puts both tracks in one batch
    client = segment_client(running, errors=errors, sync=False, gzip=False, upload_interval=1.0)
    stop_clients.append(client)

    good = send_partly_invalid(client)

    (recorder,) = recorders
    assert len(recorder.batches) == 1  # any 2xx is success for segment: no retry
    assert errors.seen == []
    assert [e.message_id for e in running.events()] == [good]
    assert [(r.reason, r.index) for r in running.rejections()] == [("invalid_field", 1)]


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_clients_rudder_retries_207_yet_the_good_event_is_stored_once(
    servers: Any, stop_clients: list[Any], kind: str
) -> None:
    """rudder-sdk-python treats only 200 as success. The seed's 207 for a partial batch
    makes it retry the whole batch and finally report it failed; dedup must still keep
    the good event exactly once."""
    recorders: list[Any] = []
    running = servers.start(kind, wrap=lossy(kind, recorders, lose=False))
    errors = Errors()
    client = RudderClient(
        WRITE_KEY,
        host=running.host,
        on_error=errors,
        max_retries=1,
        timeout=10,
        upload_interval=1.0,
    )
    stop_clients.append(client)

    good = send_partly_invalid(client)

    (recorder,) = recorders
    assert len(recorder.batches) == 2  # max_retries=1: sent twice
    assert [m for _h, body in recorder.batches for m in message_ids(_h, body)] == [
        good,
        TOO_LONG_ID,
    ] * 2
    ((error, dropped),) = errors.seen
    assert getattr(error, "status", None) == 207
    assert len(dropped) == 2
    assert [e.message_id for e in running.events()] == [good]
    assert [r.reason for r in running.rejections()] == [
        "invalid_field",
        "duplicate_message_id",
        "invalid_field",
    ]
