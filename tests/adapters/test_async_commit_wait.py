"""How an ASGI request waits for its commit: on the loop, bounded, never cancelling it."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import pytest

from fp_collect import Collector, Request, Source
from fp_collect.collector import _committed
from fp_collect.errors import StoreUnavailable
from fp_collect.store import STORED, Batch, Outcome
from fp_collect.store.memory import MemoryStore


def later(future: Future[list[Outcome]], delay: float, value: object) -> None:
    """Settle ``future`` from another thread after ``delay`` seconds, as a writer does."""

    def settle() -> None:
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    threading.Timer(delay, settle).start()


def test_the_outcomes_arrive_from_the_writer_thread() -> None:
    async def wait() -> list[Outcome]:
        commit: Future[list[Outcome]] = Future()
        later(commit, 0.01, [STORED])
        return await _committed(commit, 5)

    assert asyncio.run(wait()) == [STORED]


def test_a_failed_commit_raises_its_error() -> None:
    async def wait() -> list[Outcome]:
        commit: Future[list[Outcome]] = Future()
        later(commit, 0.01, StoreUnavailable("disk full"))
        return await _committed(commit, 5)

    with pytest.raises(StoreUnavailable, match="disk full"):
        asyncio.run(wait())


def test_a_slow_commit_times_out_and_is_not_cancelled() -> None:
    commit: Future[list[Outcome]] = Future()

    async def wait() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await _committed(commit, 0.01)
        assert not commit.cancelled()  # still the writer's to finish
        commit.set_result([STORED])  # settling it after the timeout disturbs nobody
        await asyncio.sleep(0.01)

    asyncio.run(wait())


def test_a_client_that_goes_away_does_not_cancel_the_commit() -> None:
    commit: Future[list[Outcome]] = Future()

    async def wait() -> None:
        task = asyncio.ensure_future(_committed(commit, 5))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not commit.cancelled()
        commit.set_result([STORED])
        await asyncio.sleep(0.01)

    asyncio.run(wait())


class SlowStore(MemoryStore):
    """Commits after ``delay`` seconds, from a thread of its own."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    # A Future, as Store.submit allows (it returns a Pending), though MemoryStore's own
    # submit is annotated to return a Commit.
    def submit(self, batch: Batch) -> Future[list[Outcome]]:  # type: ignore[override]
        future: Future[list[Outcome]] = Future()

        def commit() -> None:
            future.set_result(MemoryStore.submit(self, batch).result())

        threading.Timer(self.delay, commit).start()
        return future


def test_a_request_answers_503_after_commit_timeout_and_its_event_is_still_stored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = SlowStore(delay=0.3)
    collector = Collector(sources=[Source(write_key="k")], store=store, commit_timeout=0.05)
    body = b'{"writeKey": "k", "userId": "u", "event": "Product Viewed", "messageId": "m-1"}'
    route = collector.route("/v1/track")
    assert route is not None
    request = Request("POST", "/v1/track", "", {"content-type": "application/json"}, body)
    response = asyncio.run(collector.handle_async(route, request))
    assert response.status == 503
    assert ("retry-after", "5") in response.headers
    # The log says why, though a timeout's own text is empty.
    assert [r.getMessage() for r in caplog.records if r.name == "fp_collect"] == [
        "fp-collect store unavailable: not committed within commit_timeout (0.05 s)"
    ]
    # The writer finishes what it was given (polled; the bound only guards against a hang).
    for _ in range(200):
        if list(store.events()):
            break
        threading.Event().wait(0.05)
    assert [event.message_id for event in store.events()] == ["m-1"]
    collector.close()
