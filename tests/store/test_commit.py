"""Commit (what the stores' submit returns), the shared write queue, and how an event
loop is woken for a group of settled commits."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import CancelledError, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import pytest

from fp_collect.collector import _committed
from fp_collect.errors import StoreUnavailable
from fp_collect.store.base import (
    DUPLICATE,
    STORED,
    Batch,
    Commit,
    EventRecord,
    Job,
    Outcome,
    WriteQueue,
    time_left,
)

TIMEOUT = 5.0


def event(message_id: str) -> EventRecord:
    return EventRecord("src", message_id, "track", "E", "u", None, "t", "r", "{}")


def settle_later(commit: Commit, value: Any, delay: float = 0.02) -> threading.Thread:
    def settle() -> None:
        threading.Event().wait(delay)
        commit.settle(value)

    thread = threading.Thread(target=settle)
    thread.start()
    return thread


# -- Commit ----------------------------------------------------------------------------------


def test_result_waits_for_the_writer_and_every_waiter_gets_it() -> None:
    commit = Commit()
    results: list[object] = []
    waiters = [
        threading.Thread(target=lambda: results.append(commit.result(TIMEOUT))) for _ in range(3)
    ]
    for waiter in waiters:
        waiter.start()
    settle_later(commit, [STORED]).join()
    for waiter in waiters:
        waiter.join(TIMEOUT)
    assert results == [[STORED]] * 3
    assert commit.done() and not commit.cancelled()
    assert commit.result(0) == [STORED] and commit.exception(0) is None


def test_a_failed_commit_raises_its_error_to_every_caller() -> None:
    commit = Commit()
    error = StoreUnavailable("disk full")
    settle_later(commit, error).join()
    for _ in range(2):
        with pytest.raises(StoreUnavailable, match="disk full"):
            commit.result(TIMEOUT)
    assert commit.exception(0) is error


def test_result_times_out_while_pending() -> None:
    commit = Commit()
    with pytest.raises(FutureTimeout):
        commit.result(0.01)
    with pytest.raises(FutureTimeout):
        commit.result(0)
    commit.set_result([DUPLICATE])
    assert commit.result(0) == [DUPLICATE]


def test_cancel_before_the_writer_takes_it_withdraws_the_batch() -> None:
    commit = Commit()
    assert commit.cancel() and commit.cancel()  # idempotent
    assert commit.cancelled() and commit.done()
    assert not commit.set_running_or_notify_cancel()
    with pytest.raises(CancelledError):
        commit.result(0)
    with pytest.raises(InvalidStateError):
        commit.set_result([STORED])


def test_once_taken_a_commit_cannot_be_cancelled_nor_settled_twice() -> None:
    commit = Commit()
    assert commit.set_running_or_notify_cancel()
    assert not commit.cancel()
    with pytest.raises(InvalidStateError):
        commit.set_running_or_notify_cancel()
    commit.set_result([STORED])
    with pytest.raises(InvalidStateError):
        commit.set_exception(StoreUnavailable("late"))
    assert commit.result(0) == [STORED]


def test_callbacks_run_once_when_settled_or_at_once_when_done() -> None:
    commit = Commit()
    seen: list[tuple[str, Commit]] = []

    def boom(_: Commit) -> None:
        raise RuntimeError("a bad callback")

    commit.add_done_callback(lambda c: seen.append(("before", c)))
    commit.add_done_callback(boom)  # logged; the others still run
    commit.add_done_callback(lambda c: seen.append(("before, after boom", c)))
    commit.set_result([STORED])
    commit.add_done_callback(lambda c: seen.append(("after", c)))
    assert seen == [("before", commit), ("before, after boom", commit), ("after", commit)]


def test_cancelling_runs_the_callbacks() -> None:
    commit = Commit()
    seen: list[bool] = []
    commit.add_done_callback(lambda c: seen.append(c.cancelled()))
    commit.cancel()
    assert seen == [True]


# -- WriteQueue ------------------------------------------------------------------------------


def test_a_group_is_what_is_queued_without_the_cancelled() -> None:
    writes = WriteQueue("closed")
    kept = writes.submit(Batch(events=[event("m1")]))
    dropped = writes.submit(Batch(events=[event("m2")]))
    last = writes.submit(Batch(events=[event("m3")]))
    assert dropped.cancel()
    group, stopping = writes.next_group(10)
    assert [job.commit for job in group] == [kept, last] and not stopping
    assert not kept.cancel()  # taken for writing: too late to withdraw


def test_a_group_stops_growing_at_its_limits() -> None:
    writes = WriteQueue("closed")
    for i in range(5):
        writes.submit(Batch(events=[event(f"m{i}"), event(f"n{i}")]))
    assert len(writes.next_group(2)[0]) == 2
    assert len(writes.next_group(10, max_rows=3)[0]) == 2  # 4 rows: it stopped at >= 3
    assert len(writes.next_group(10)[0]) == 1


def test_close_lets_the_writer_finish_what_was_queued_then_refuses() -> None:
    writes = WriteQueue("the store is closed")
    first = writes.submit(Batch())
    assert writes.close() and not writes.close()
    with pytest.raises(StoreUnavailable, match="the store is closed"):
        writes.submit(Batch())
    group, stopping = writes.next_group(10)
    assert [job.commit for job in group] == [first] and stopping


def test_take_all_takes_everything_queued_for_failing() -> None:
    writes = WriteQueue("closed")
    commits = [writes.submit(Batch()) for _ in range(700)]
    writes.close()
    taken, stopping = writes.take_all()
    assert [job.commit for job in taken] == commits and stopping
    assert not any(commit.cancel() for commit in commits)


# -- waking the event loop -------------------------------------------------------------------


def test_a_group_settled_at_once_wakes_the_loop_once() -> None:
    async def main() -> tuple[list[list[Outcome]], int]:
        loop = asyncio.get_running_loop()
        wakes = 0
        wake = loop.call_soon_threadsafe

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal wakes
            wakes += 1
            return wake(*args, **kwargs)

        # Patched on this loop only. Besides the method assignment, mypy refuses a
        # (*args: Any, **kwargs: Any) function for its TypeVarTuple signature.
        loop.call_soon_threadsafe = counting  # type: ignore[method-assign, assignment]
        commits = [Commit() for _ in range(25)]
        waiting = [asyncio.ensure_future(_committed(commit, TIMEOUT)) for commit in commits]
        await asyncio.sleep(0)  # every request is waiting on its commit

        # A writer thread settles the whole group while the loop is busy elsewhere.
        def settle_all() -> None:
            for c in commits:
                c.set_result([STORED])

        writer = threading.Thread(target=settle_all)
        writer.start()
        writer.join()
        results = await asyncio.gather(*waiting)
        # And the next group wakes it again.
        later = Commit()
        waiting_later = asyncio.ensure_future(_committed(later, TIMEOUT))
        await asyncio.sleep(0)
        settle_later(later, [DUPLICATE], delay=0)
        results.append(await waiting_later)
        return results, wakes

    results, wakes = asyncio.run(main())
    assert results == [[STORED]] * 25 + [[DUPLICATE]]
    assert wakes == 2


def test_one_commit_failing_in_a_group_fails_only_its_request() -> None:
    async def main() -> list[object]:
        commits = [Commit() for _ in range(3)]
        waiting = [asyncio.ensure_future(_committed(commit, TIMEOUT)) for commit in commits]
        await asyncio.sleep(0)
        commits[0].set_result([STORED])
        commits[1].set_exception(StoreUnavailable("batch not stored"))
        commits[2].set_result([DUPLICATE])
        return await asyncio.gather(*waiting, return_exceptions=True)

    first, second, third = asyncio.run(main())
    assert first == [STORED] and third == [DUPLICATE]
    assert isinstance(second, StoreUnavailable)


def test_a_commit_settled_before_the_wait_is_answered_without_a_wake_up() -> None:
    async def main() -> list[Outcome]:
        done, cancelled = Commit(), Commit()
        done.set_result([STORED])
        cancelled.cancel()
        outcomes = await _committed(done, TIMEOUT)
        with pytest.raises(StoreUnavailable, match="cancelled"):
            await _committed(cancelled, TIMEOUT)
        return outcomes

    assert asyncio.run(main()) == [STORED]


def test_waiters_on_two_loops_are_each_woken_on_their_own() -> None:
    commits = [Commit(), Commit()]
    results: list[object] = []
    started = threading.Barrier(3)

    def serve(commit: Commit) -> None:
        async def wait() -> None:
            task = asyncio.ensure_future(_committed(commit, TIMEOUT))
            await asyncio.sleep(0)
            started.wait(TIMEOUT)
            results.append(await task)

        asyncio.run(wait())

    loops = [threading.Thread(target=serve, args=(commit,)) for commit in commits]
    for thread in loops:
        thread.start()
    started.wait(TIMEOUT)
    commits[0].set_result([STORED])
    commits[1].set_result([DUPLICATE])
    for thread in loops:
        thread.join(TIMEOUT)
    assert sorted(map(str, results)) == sorted(map(str, [[STORED], [DUPLICATE]]))


# -- WriteQueue.commit_here ----------------------------------------------------------------


def storing(written_by: list[str], time_seen: list[float | None]) -> Any:
    """A store's group commit that records who ran it and the time it was told it had."""

    def write(jobs: list[Job]) -> None:
        written_by.append(threading.current_thread().name)
        time_seen.append(time_left())
        for job in jobs:
            job.commit.settle([STORED])

    return write


def test_a_write_done_in_the_callers_thread_is_told_the_time_it_has() -> None:
    queue = WriteQueue("closed")
    written_by: list[str] = []
    time_seen: list[float | None] = []
    write = storing(written_by, time_seen)
    assert queue.commit_here(Batch(events=[event("m1")]), 2.0, write) == [STORED]
    assert queue.commit_here(Batch(events=[event("m2")]), None, write) == [STORED]
    assert written_by == [threading.current_thread().name] * 2
    bounded, unbounded = time_seen
    assert bounded is not None and 0 < bounded <= 2.0
    assert unbounded is None
    assert time_left() is None  # only while that write runs


def test_a_caller_with_less_time_than_the_stores_longest_write_hands_it_over() -> None:
    """A store that cannot cut its own waits short (``longest_write``) must not make a
    caller with a shorter timeout wait for them: the writer thread writes instead, and
    the caller's wait for it is bounded."""
    queue = WriteQueue("closed")
    written_by: list[str] = []
    time_seen: list[float | None] = []
    write = storing(written_by, time_seen)

    def writer() -> None:
        group, _ = queue.next_group(10)
        write(group)

    thread = threading.Thread(target=writer, name="the-writer")
    thread.start()
    batch = Batch(events=[event("m1")])
    assert queue.commit_here(batch, 1.0, write, longest_write=5.0) == [STORED]
    thread.join(TIMEOUT)
    assert written_by == ["the-writer"]
    assert time_seen == [None]  # the writer thread's waits are its own
    assert queue.commit_here(batch, 5.0, write, longest_write=5.0) == [STORED]
    assert written_by == ["the-writer", threading.current_thread().name]
