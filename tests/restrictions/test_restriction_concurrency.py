"""Restrictions stay exact when many threads, or two worker processes sharing one
SQLite file, receive the same confirmations and email opens at the same moment."""

from __future__ import annotations

import json
import multiprocessing
import threading
from collections import Counter
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest

from fp_collect import Collector, Request, Source
from fp_collect.store import open_store

KEY = "concurrent-key"
NOW = 1_700_000_000.0
ORDERS = [f"order-{n}" for n in range(20)]
USERS = [f"user-{n}" for n in range(10)]
TIMEOUT = 60


def requests(worker: int) -> list[tuple[str, dict[str, Any]]]:
    """What every worker sends: the same orders and opens, each under its own messageId
    (distinct deliveries, not retries), confirmations through both track dialects."""
    sent: list[tuple[str, dict[str, Any]]] = []
    for n, order in enumerate(ORDERS):
        message_id = f"w{worker}-{order}"
        if n % 2:
            body = {"writeKey": KEY, "userId": f"buyer-{n}", "event": "Order Completed",
                    "properties": {"order_id": order}, "messageId": message_id}  # fmt: skip
            sent.append(("/v1/track", body))
        else:
            body = {"write_key": KEY, "user_id": f"buyer-{n}", "event": "Order Completed",
                    "properties": {"orderId": order}, "message_id": message_id}  # fmt: skip
            sent.append(("/events/track", body))
    for user in USERS:
        for campaign in ("spring", "summer"):
            body = {"writeKey": KEY, "userId": user, "event": "Email Opened",
                    "properties": {"campaign_id": campaign},
                    "messageId": f"w{worker}-{user}-{campaign}"}  # fmt: skip
            sent.append(("/v1/track", body))
    return sent


def deliver(collector: Collector, sent: list[tuple[str, dict[str, Any]]]) -> list[int]:
    statuses: list[int] = []
    for path, body in sent:
        route = collector.route(path)
        assert route is not None
        headers = {"content-type": "application/json"}
        request = Request("POST", path, "", headers, json.dumps(body).encode(), "10.0.0.1")
        statuses.append(collector.handle(route, request).status)
    return statuses


def make_collector(storage: str) -> Collector:
    return Collector(sources=[Source(write_key=KEY, id="site")], storage=storage, clock=lambda: NOW)


def check_exactly_once(storage: str, workers: int) -> None:
    with open_store(storage) as store:
        stored = list(store.events())
        reasons = Counter(rejection.reason for rejection in store.rejections())
    orders = Counter(json.loads(e.payload)["properties"].get("order_id") or
                     json.loads(e.payload)["properties"].get("orderId")
                     for e in stored if e.name == "Order Completed")  # fmt: skip
    assert orders == Counter({order: 1 for order in ORDERS})
    opens = Counter(
        (e.user_id, json.loads(e.payload)["properties"]["campaign_id"])
        for e in stored
        if e.name == "Email Opened"
    )
    assert opens == Counter({(u, c): 1 for u in USERS for c in ("spring", "summer")})
    assert reasons == {
        "duplicate_order_id": len(ORDERS) * (workers - 1),
        "email_open_throttled": len(USERS) * 2 * (workers - 1),
    }


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_threads_keep_one_confirmation_per_order_and_one_open_per_window(
    backend: str, tmp_path: Path
) -> None:
    storage = "memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'r.db'}"
    collector = make_collector(storage)
    workers = 8
    barrier = threading.Barrier(workers)
    statuses: list[int] = []
    lock = threading.Lock()

    def work(worker: int) -> None:
        sent = requests(worker)
        barrier.wait(TIMEOUT)
        answered = deliver(collector, sent)
        with lock:
            statuses.extend(answered)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert set(statuses) == {200}
    assert len(statuses) == workers * len(requests(0))
    if backend == "memory":
        # The memory store lives in this process only: check it before closing.
        stored = list(collector.store.events())
        assert sum(e.name == "Order Completed" for e in stored) == len(ORDERS)
        assert sum(e.name == "Email Opened" for e in stored) == len(USERS) * 2
        collector.close()
        return
    collector.close()
    check_exactly_once(storage, workers)


def _process_worker(storage: str, worker: int, barrier: Barrier, results: Queue[list[int]]) -> None:
    collector = make_collector(storage)
    try:
        sent = requests(worker)
        barrier.wait(TIMEOUT)
        results.put(deliver(collector, sent))
    finally:
        collector.close()


def test_two_processes_on_one_sqlite_file_keep_the_restrictions_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Spawned children unpickle _process_worker by module name; under
    # --import-mode=importlib that needs the tests' root on sys.path (children inherit it).
    monkeypatch.syspath_prepend(Path(__file__).parents[__name__.count(".")])
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    make_collector(storage).close()  # create the file once, as a deployment would
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results: Queue[list[int]] = ctx.Queue()
    processes = [
        ctx.Process(target=_process_worker, args=(storage, n, barrier, results)) for n in range(2)
    ]
    for process in processes:
        process.start()
    statuses = [results.get(timeout=TIMEOUT) for _ in processes]
    for process in processes:
        process.join(TIMEOUT)
        assert process.exitcode == 0
    assert {status for answered in statuses for status in answered} == {200}
    check_exactly_once(storage, workers=2)
