"""Scale-out: two collector processes on different ports share one PostgreSQL (and, in
turn, one Redis). The same messageIds, orderIds and email opens sent to both at once
end up stored exactly as one process would store them.

Each instance is the real dev server (``fp-collect serve --config``), as a site would
run several app instances behind a load balancer.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fp_collect import Collector, Request, Source
from fp_collect.store import Store, open_store

KEY = "scale-key"
TIMEOUT = 30.0  # guards against a hang only
TIMESTAMP = "2026-11-23T10:00:00.000Z"


def workload(instance: int) -> list[tuple[str, dict[str, Any]]]:
    """What each instance receives: a client retrying the same messages everywhere,
    plus confirmations and email opens delivered twice under fresh messageIds."""
    sent: list[tuple[str, dict[str, Any]]] = []
    for n in range(30):  # retries: the same messageId at both instances
        sent.append(("/v1/track", {"userId": f"u-{n % 5}", "event": "Product Viewed",
                                   "messageId": f"view-{n}", "timestamp": TIMESTAMP}))  # fmt: skip
    for n in range(10):  # one order, two deliveries
        sent.append(("/v1/track", {"userId": f"buyer-{n}", "event": "Order Completed",
                                   "properties": {"order_id": f"order-{n}"},
                                   "messageId": f"i{instance}-order-{n}",
                                   "timestamp": TIMESTAMP}))  # fmt: skip
    for n in range(10):  # one open, two pixels loaded
        sent.append(("/events/track", {"event": "Email Opened", "user_id": f"reader-{n}",
                                       "properties": {"campaign_id": "autumn"},
                                       "message_id": f"i{instance}-open-{n}",
                                       "timestamp": TIMESTAMP}))  # fmt: skip
    for n in range(5):  # identify the same people from both instances
        sent.append(("/v1/identify", {"userId": f"u-{n}", "traits": {"email": f"u{n}@example.com"},
                                      "messageId": f"i{instance}-identify-{n}"}))  # fmt: skip
    return sent


def with_key(path: str, body: dict[str, Any]) -> bytes:
    field = "write_key" if path.startswith("/events/") else "writeKey"
    return json.dumps({**body, field: KEY}).encode()


def shape(store: Store) -> tuple[Counter[tuple[str, str]], Counter[str], int]:
    """What was stored, by meaning rather than by which copy won: one entry per view,
    order and open; the reasons for what was refused; and the number of profiles."""
    stored: Counter[tuple[str, str]] = Counter()
    profiles = set()
    for event in store.events():
        payload = json.loads(event.payload)
        if event.name == "Order Completed":
            stored[("order", payload["properties"]["order_id"])] += 1
        elif event.name == "Email Opened":
            stored[("open", payload["user_id"])] += 1
        elif event.type == "identify":
            stored[("identify", payload["userId"])] += 1
        else:
            stored[("view", event.message_id)] += 1
        assert event.profile_id is not None
        profile = store.profile(event.profile_id)
        assert profile is not None
        profiles.add(profile.id)
    reasons = Counter(rejection.reason for rejection in store.rejections())
    return stored, reasons, len(profiles)


def reference() -> tuple[Counter[tuple[str, str]], Counter[str], int]:
    """One process receiving both instances' requests, one after the other."""
    collector = Collector(sources=[Source(write_key=KEY, id="site")], storage="memory://")
    try:
        for instance in (0, 1):
            for path, body in workload(instance):
                raw = with_key(path, body)
                route = collector.route(path)
                assert route is not None
                headers = {"content-type": "application/json"}
                assert (
                    collector.handle(route, Request("POST", path, "", headers, raw)).status == 200
                )
        return shape(collector.store)
    finally:
        collector.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def post(port: int, path: str, body: dict[str, Any]) -> int:
    raw = with_key(path, body)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=raw,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def wait_until_up(port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert server.poll() is None, "the collector process exited"
        try:
            with socket.create_connection(("127.0.0.1", port), 1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
def instances(tmp_path: Path) -> Iterator[Callable[[str], list[int]]]:
    """``start(storage)`` runs two collector processes on that storage; their ports."""
    servers: list[subprocess.Popen[bytes]] = []

    def start(storage: str) -> list[int]:
        config = tmp_path / "fp-collect.toml"
        config.write_text(f'storage = "{storage}"\n[[sources]]\nid = "site"\nwrite_key = "{KEY}"\n')
        ports = [free_port(), free_port()]
        for port in ports:
            servers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "fp_collect",
                        "serve",
                        "--config",
                        str(config),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port, server in zip(ports, servers, strict=True):
            wait_until_up(port, server)
        return ports

    yield start
    for server in servers:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def send_to_both_at_once(ports: list[int]) -> list[int]:
    barrier = threading.Barrier(len(ports))
    statuses: list[int] = []
    lock = threading.Lock()

    def deliver(instance: int, port: int) -> None:
        sent = workload(instance)
        barrier.wait(TIMEOUT)
        answered = [post(port, path, body) for path, body in sent]
        with lock:
            statuses.extend(answered)

    threads = [threading.Thread(target=deliver, args=pair) for pair in enumerate(ports)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 4)
    return statuses


@pytest.fixture
def postgres_storage(postgres_dsn: str) -> Iterator[str]:
    import psycopg

    schema = f"fpc_scale_{uuid.uuid4().hex[:12]}"
    yield f"{postgres_dsn}?schema={schema}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def redis_storage(redis_url: str) -> Iterator[str]:
    import redis

    prefix = f"fpc-scale-{uuid.uuid4().hex[:12]}:"
    yield f"{redis_url}?prefix={prefix}"
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.unlink(*keys)
    finally:
        client.close()


@pytest.mark.parametrize("backend", ["postgres_storage", "redis_storage"])
def test_two_instances_store_exactly_what_one_would(
    backend: str, request: pytest.FixtureRequest, instances: Callable[[str], list[int]]
) -> None:
    storage: str = request.getfixturevalue(backend)
    ports = instances(storage)
    statuses = send_to_both_at_once(ports)
    assert statuses == [200] * (2 * len(workload(0)))
    expected = reference()
    with open_store(storage) as store:
        assert shape(store) == expected
    stored, reasons, profiles = expected
    # views once, orders once, opens once, and both deliveries of each identify
    assert sum(stored.values()) == 30 + 10 + 10 + 2 * 5
    assert profiles == 5 + 10 + 10  # viewers (identified), buyers, readers
    assert reasons == {"duplicate_message_id": 30, "duplicate_order_id": 10,
                       "email_open_throttled": 10}  # fmt: skip
