"""Suite-wide settings and fixtures.

* Hypothesis profiles: deterministic in CI, brief by default.
* ``postgres_dsn`` / ``redis_url``: the project's shared services. A machine without them
  skips the tests that need them, with the reason; where ``CI=true`` an unreachable
  service fails the run instead, so CI can never go green without exercising them.
* ``tcp_proxy``: a small TCP proxy a test can cut, stall and restore, to simulate a
  backend outage without touching the shared services themselves.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=150,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=40, deadline=None)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") == "true" else "dev")
)

IN_CI = os.environ.get("CI") == "true"
POSTGRES_DSN = os.environ.get("FP_COLLECT_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")
REDIS_URL = os.environ.get("FP_COLLECT_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        address = (parts.hostname or "127.0.0.1", parts.port or default_port)
        with socket.create_connection(address, 2):
            return True
    except OSError:
        return False


def _require_service(name: str, url: str, default_port: int, how: str) -> str:
    if _reachable(url, default_port):
        return url
    message = f"{name} is not reachable at {url}; {how}"
    if IN_CI:
        pytest.fail(f"CI=true needs the real service: {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The shared PostgreSQL server (database ``test``, trust auth)."""
    return _require_service(
        "PostgreSQL",
        POSTGRES_DSN,
        5432,
        "start it (see README, 'Running the tests') or set FP_COLLECT_TEST_POSTGRES",
    )


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis server."""
    return _require_service(
        "Redis",
        REDIS_URL,
        6379,
        "start it (see README, 'Running the tests') or set FP_COLLECT_TEST_REDIS",
    )


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target``, until a test cuts or stalls it.

    * ``cut()``: every open connection is closed and new ones are refused at once
      (accepted, then closed): the backend looks down.
    * ``stall()``: connections stay open but no byte moves in either direction, and
      new ones are accepted but never answered: the backend looks hung.
    * ``restore()``: forwarding resumes; connections cut earlier stay closed.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._flowing = threading.Event()
        self._flowing.set()
        self._down = False
        self._closed = False
        threading.Thread(target=self._accept, name="tcp-proxy-accept", daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            self._down = True
            doomed, self._open = self._open, set()
        for sock in doomed:
            _close(sock)
        self._flowing.set()  # wake stalled pumps so they notice their sockets are gone

    def stall(self) -> None:
        self._flowing.clear()

    def restore(self) -> None:
        with self._lock:
            self._down = False
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        _close(self._listener)
        self.cut()

    def url(self, template: str) -> str:
        """``template`` with its host:port replaced by this proxy's."""
        parts = urlsplit(template)
        netloc = parts.netloc.rpartition("@")
        auth = netloc[0] + netloc[1]
        return parts._replace(netloc=f"{auth}127.0.0.1:{self.port}").geturl()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._flowing.wait()
        with self._lock:
            down = self._down
        if down:
            _close(client)
            return
        try:
            upstream = socket.create_connection(self.target, 5)
        except OSError:
            _close(client)
            return
        upstream.settimeout(None)
        with self._lock:
            self._open.update((client, upstream))
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()
                with self._lock:
                    if self._down:
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[str, int], TcpProxy]]:
    """A factory: ``tcp_proxy(host, port)`` starts a proxy, stopped when the test ends."""
    proxies: list[TcpProxy] = []

    def start(host: str, port: int) -> TcpProxy:
        proxy = TcpProxy((host, port))
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()
