"""Shared fixtures for the user-event API (``POST /v1/event``, seed 003).

Every test talks to the collector through a :class:`Harness`: the same calls go through
``Collector.handle`` directly (``core``), through Flask with ``init_app`` and werkzeug's
test ``Client`` (``flask``), or through Starlette with ``CollectorMiddleware`` and its
``TestClient`` (``starlette``). Helpers live here as fixtures because the tests run with
``--import-mode=importlib`` (no package to import them from).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from starlette.applications import Starlette
from starlette.testclient import TestClient
from werkzeug.datastructures import Headers
from werkzeug.test import Client, EnvironBuilder, run_wsgi_app

from fp_collect import Collector, Request, Source, Store
from fp_collect.adapters.asgi import CollectorMiddleware
from fp_collect.adapters.wsgi import init_app
from fp_collect.errors import StoreUnavailable
from fp_collect.store.base import (
    Batch,
    Outcome,
    Query,
    StoredEvent,
    StoredProfile,
    StoredRejection,
)

KEY = "ue-key"  # source "shop": browsers only from https://shop.example
OTHER_KEY = "other-key"  # source "shop-b", same workspace, any origin
PREFIX = "/collect"
ORIGIN = "https://shop.example"
START = 1_700_000_000.0


class Clock:
    """A clock the tests move by hand: ``Collector(..., clock=clock)``."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def basic(key: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{key}:{password}".encode()).decode()


class Harness:
    """One collector and one way of sending it requests.

    ``send`` posts to any collection path below the prefix; ``event`` posts a user event
    with the write key in the body; ``identify``/``track``/``fp_track`` create users
    through the other dialects.
    """

    def __init__(self, collector: Collector, transport: str, send: Callable[..., Answer]) -> None:
        self.collector = collector
        self.transport = transport
        self._send = send

    @property
    def store(self) -> Store:
        return self.collector.store

    def send(
        self,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        method: str = "POST",
        headers: dict[str, str] | None = None,
    ) -> Answer:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        all_headers = {"content-type": "application/json", **(headers or {})}
        return self._send(method, PREFIX + path, data, all_headers, False)

    def send_chunked(self, path: str, data: bytes, headers: dict[str, str] | None = None) -> Answer:
        """POST ``data`` without Content-Length, as a chunked upload (adapters only)."""
        all_headers = {"content-type": "application/json", **(headers or {})}
        return self._send("POST", PREFIX + path, data, all_headers, True)

    def event(
        self,
        user: Any,
        event: Any,
        *,
        key: str | None = KEY,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> Answer:
        body: dict[str, Any] = {"user": user, "event": event, **extra}
        if key is not None:
            body["writeKey"] = key
        return self.send("/v1/event", body, headers=headers)

    def identify(self, user_id: str, key: str = KEY, **fields: Any) -> Answer:
        answer = self.send("/v1/identify", {"writeKey": key, "userId": user_id, **fields})
        assert answer.status == 200, answer.body
        return answer

    def track(self, event: str, key: str = KEY, **fields: Any) -> Answer:
        answer = self.send("/v1/track", {"writeKey": key, "event": event, **fields})
        assert answer.status == 200, answer.body
        return answer

    def fp_track(self, event: str, key: str = KEY, **fields: Any) -> str:
        """A Firstparty ``/events/track``; the profile id it answers."""
        answer = self.send("/events/track", {"write_key": key, "event": event, **fields})
        assert answer.status == 200 and answer.json["success"] is True, answer.body
        profile_id: str = answer.json["profile_id"]
        return profile_id

    # -- reading back -------------------------------------------------------------------

    def events(self, **query: Any) -> list[StoredEvent]:
        return list(self.store.events(Query(**query)))

    def payloads(self, **query: Any) -> list[dict[str, Any]]:
        return [json.loads(e.payload) for e in self.events(**query)]

    def rejections(self, **query: Any) -> list[StoredRejection]:
        return list(self.store.rejections(Query(**query)))

    def profile(self, profile_id: str) -> StoredProfile:
        profile = self.store.profile(profile_id)
        assert profile is not None, f"no profile {profile_id}"
        return profile


def _core_sender(collector: Collector) -> Callable[..., Answer]:
    def send(method: str, path: str, data: bytes, headers: dict[str, str], chunked: bool) -> Answer:
        assert not chunked, "chunked bodies are an adapter matter"
        route = collector.route(path)
        assert route is not None, f"{path} is not a collection route"
        request = Request(method, path, "", headers, data, "10.0.0.1")
        response = collector.handle(route, request)
        names = {name.lower(): value for name, value in response.headers}
        return Answer(response.status.value, names, response.body)

    return send


def _flask_sender(collector: Collector) -> Callable[..., Answer]:
    app = Flask(__name__)

    @app.get("/")
    def home() -> str:
        return "home"

    assert init_app(app, collector=collector) is collector
    client = Client(app)

    def send(method: str, path: str, data: bytes, headers: dict[str, str], chunked: bool) -> Answer:
        if chunked:
            # What a de-chunking server (gunicorn, werkzeug's) hands the app: no
            # Content-Length, the stream marked as terminated.
            environ = EnvironBuilder(
                path=path,
                method=method,
                input_stream=io.BytesIO(data),
                headers=Headers({**headers, "transfer-encoding": "chunked"}),
            ).get_environ()
            del environ["CONTENT_LENGTH"]
            environ["wsgi.input_terminated"] = True
            # Called directly: the test Client rebuilds the environ, Content-Length too.
            app_iter, status, raw_headers = run_wsgi_app(app, environ, buffered=True)
            names = {name.lower(): value for name, value in raw_headers.items()}
            return Answer(int(status.split()[0]), names, b"".join(app_iter))
        response = client.open(path, method=method, data=data, headers=headers)
        names = {name.lower(): value for name, value in response.headers.items()}
        return Answer(response.status_code, names, response.get_data())

    return send


def _starlette_sender(collector: Collector, stack: ExitStack) -> Callable[..., Answer]:
    app = Starlette()
    app.add_middleware(CollectorMiddleware, collector=collector)
    client = stack.enter_context(TestClient(app))

    def send(method: str, path: str, data: bytes, headers: dict[str, str], chunked: bool) -> Answer:
        # An iterator makes the client send Transfer-Encoding: chunked, no Content-Length.
        pieces = [data[i : i + 4096] for i in range(0, len(data), 4096)]
        content: Any = iter(pieces) if chunked else data
        response = client.request(method, path, content=content, headers=headers)
        names = {name.lower(): value for name, value in response.headers.items()}
        return Answer(response.status_code, names, response.content)

    return send


@dataclass
class Factory:
    tmp_path: Path
    clock: Clock
    stack: ExitStack = field(default_factory=ExitStack)
    count: int = 0

    def __call__(
        self,
        transport: str = "core",
        storage: str = "memory",
        *,
        sources: list[Source] | None = None,
        store: Store | None = None,
        **config: Any,
    ) -> Harness:
        self.count += 1
        if sources is None:
            sources = [
                Source(write_key=KEY, id="shop", allowed_origins=(ORIGIN,)),
                Source(write_key=OTHER_KEY, id="shop-b"),
            ]
        url = (
            "memory://"
            if storage == "memory"
            else f"sqlite:///{self.tmp_path / f'ue{self.count}.db'}"
        )
        collector = Collector(
            sources=sources, storage=url, prefix=PREFIX, clock=self.clock, store=store, **config
        )
        self.stack.callback(collector.close)
        if transport == "core":
            send = _core_sender(collector)
        elif transport == "flask":
            send = _flask_sender(collector)
        elif transport == "starlette":
            send = _starlette_sender(collector, self.stack)
        else:  # pragma: no cover - a typo in a test
            raise ValueError(transport)
        return Harness(collector, transport, send)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_harness(tmp_path: Path, clock: Clock) -> Iterator[Factory]:
    """Build harnesses: ``make_harness("flask", "sqlite", sources=[...], **config)``."""
    factory = Factory(tmp_path, clock)
    with factory.stack:
        yield factory


@pytest.fixture(params=["memory", "sqlite"])
def harness(request: pytest.FixtureRequest, make_harness: Factory) -> Harness:
    """The core (``Collector.handle``) on each store backend."""
    storage: str = request.param
    return make_harness("core", storage)


@pytest.fixture(params=["flask", "starlette"])
def adapter(request: pytest.FixtureRequest, make_harness: Factory) -> Harness:
    """Each framework adapter, on SQLite under ``tmp_path``, mounted at ``/collect``."""
    transport: str = request.param
    return make_harness(transport, "sqlite")


class UnavailableStore(Store):
    """A store that is down: every commit's future raises StoreUnavailable."""

    def __init__(self) -> None:
        self.submitted: list[Batch] = []

    def submit(self, batch: Batch) -> Future[list[Outcome]]:
        self.submitted.append(batch)
        future: Future[list[Outcome]] = Future()
        future.set_exception(StoreUnavailable("the database is down"))
        return future

    def events(self, query: Query = Query()) -> Iterator[StoredEvent]:
        return iter(())

    def rejections(self, query: Query = Query()) -> Iterator[StoredRejection]:
        return iter(())

    def profile(self, profile_id: str) -> StoredProfile | None:
        return None


@pytest.fixture
def unavailable_store() -> UnavailableStore:
    return UnavailableStore()


@pytest.fixture
def known_user() -> Callable[[Harness], str]:
    """Make Ann known (Segment identify: userId ``u-ann``, email ``ann@example.com``) and
    return her profile id."""

    def make(harness: Harness) -> str:
        harness.identify("u-ann", traits={"email": "ann@example.com", "plan": "free"})
        (event,) = harness.events(type="identify", source_id="shop")[-1:]
        assert event.profile_id is not None
        return event.profile_id

    return make
