"""Real servers on 127.0.0.1 for the integration tests.

``servers.start("asgi")`` runs uvicorn serving a Starlette app with CollectorMiddleware;
``servers.start("wsgi")`` runs werkzeug's threaded dev server over a Flask app with
``init_app``. Both use a fresh SQLite store under ``tmp_path`` and mount the collector
at ``/collect``. Everything is stopped when the test ends.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from flask import Flask, request
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from werkzeug.serving import make_server

from fp_collect import Collector, Source
from fp_collect.adapters import asgi, wsgi
from fp_collect.store import StoredEvent, StoredRejection, open_store

WRITE_KEY = "wk_integration"
SOURCE_ID = "src_integration"
PREFIX = "/collect"
START_TIMEOUT = 10.0


async def _home(request: StarletteRequest) -> PlainTextResponse:
    return PlainTextResponse("home")


async def _echo(request: StarletteRequest) -> Response:
    return Response(await request.body(), media_type="application/octet-stream")


def asgi_site(storage: str, source: Source) -> tuple[Starlette, Collector]:
    collector = Collector(sources=[source], storage=storage, prefix=PREFIX)
    app = Starlette(routes=[Route("/", _home), Route("/echo", _echo, methods=["POST"])])
    app.add_middleware(asgi.CollectorMiddleware, collector=collector)
    return app, collector


def wsgi_site(storage: str, source: Source) -> tuple[Flask, Collector]:
    app = Flask("fp_collect_integration")

    @app.get("/")
    def home() -> str:
        return "home"

    @app.post("/echo")
    def echo() -> bytes:
        return request.get_data()

    collector = wsgi.init_app(app, sources=[source], storage=storage, prefix=PREFIX)
    return app, collector


@contextmanager
def run_uvicorn(app: Any) -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="on", ws="none", log_level="warning", access_log=False, timeout_notify=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        thread.join(START_TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@contextmanager
def run_werkzeug(app: Any) -> Iterator[int]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(START_TIMEOUT)
        assert not thread.is_alive(), "werkzeug did not stop"


@dataclass
class Running:
    kind: str
    port: int
    storage: str
    collector: Collector
    stop: Callable[[], None]

    @property
    def base(self) -> str:
        """The site's root URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """What the Segment-spec SDKs take as ``host``: they append ``/v1/batch``."""
        return self.base + PREFIX

    def events(self) -> list[StoredEvent]:
        with open_store(self.storage) as store:
            return list(store.events())

    def rejections(self) -> list[StoredRejection]:
        with open_store(self.storage) as store:
            return list(store.rejections())


class Servers:
    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self._stack = ExitStack()
        self._count = 0

    def start(
        self, kind: str, wrap: Callable[[Any], Any] | None = None, **source_options: Any
    ) -> Running:
        """Serve a fresh site; ``wrap`` puts a test middleware around the whole app;
        ``source_options`` configure its one source."""
        source = Source(write_key=WRITE_KEY, id=SOURCE_ID, **source_options)
        self._count += 1
        storage = f"sqlite:///{self._tmp_path / f'{kind}-{self._count}.db'}"
        stack = ExitStack()
        if kind == "asgi":
            site, collector = asgi_site(storage, source)
            app: Any = wrap(site) if wrap else site
            # uvicorn's lifespan shutdown closes the collector (CollectorMiddleware).
            port = stack.enter_context(run_uvicorn(app))
        elif kind == "wsgi":
            flask_app, collector = wsgi_site(storage, source)
            stack.callback(collector.close)  # no lifespan in WSGI: close it ourselves
            app = wrap(flask_app) if wrap else flask_app
            port = stack.enter_context(run_werkzeug(app))
        else:
            raise ValueError(kind)
        self._stack.push(stack)
        return Running(kind, port, storage, collector, stack.close)

    def close(self) -> None:
        self._stack.close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    running = Servers(tmp_path)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(params=["asgi", "wsgi"])
def server(request: pytest.FixtureRequest, servers: Servers) -> Running:
    """One real server of each kind, in turn."""
    return servers.start(request.param)
