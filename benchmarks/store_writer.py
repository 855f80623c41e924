"""In-process benchmark of the SQLite store's writer: CPU per event of one group commit.

Builds track calls exactly as a request would (the collector's own ``prepare``, the body
``core_pipeline.py`` and ``http_load.py`` send: a random messageId, an order id of its own,
so one order-id claim per event), then commits them through the real
:class:`~fp_collect.store.sqlite.SQLiteStore` on a temporary file, a group at a time, and
reports the CPU time the committing thread spent per event (``time.thread_time``: user
and system time, so the WAL writes count; the fsync's wait does not).

Cases: groups of 1 request (Flask under one sync worker: a transaction per request), 25
(a group under Starlette load) and 100 single-event requests, and one ``/v1/batch`` of 100
events; each for new visitors (a profile and an identity made per event) and returning
ones (drawn from the users of the prefill). The ``+sessions`` cases give every event the
session a source with ``session_timeout`` asks for (the Firstparty and user-event APIs):
a returning visitor's latest session is looked up and its ``last_seen`` moved on.

    python benchmarks/store_writer.py                 # about a minute
    python benchmarks/store_writer.py --quick         # a smoke run of a few seconds
    python benchmarks/store_writer.py --synchronous NORMAL --prefill 200000

Absolute figures drift on a shared machine; compare runs made a few seconds apart, or
use ``--repeat`` (the table shows each case's best round and the median).
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import core_pipeline  # beside this script: the same request bodies
from core_pipeline import HEADERS, WRITE_KEY

from fp_collect import Collector, Request, Source
from fp_collect.decoding import dumps
from fp_collect.store.base import Batch, Commit, Job, SessionOp
from fp_collect.store.sqlite import SQLiteStore

USERS = 10_000  # the returning visitors: made by the prefill, as http_load.py cycles 10,000


def track_message(user: str) -> dict[str, object]:
    """``core_pipeline.py``'s track call (which ``http_load.py`` sends too) for ``user``,
    with an order id of its own."""
    message = core_pipeline.track_message(0)
    message["userId"] = user
    properties = message["properties"]
    assert isinstance(properties, dict)
    properties["order_id"] = f"order-{message['messageId']}"
    return message


class Requests:
    """Batches as the collector prepares them for the store."""

    def __init__(self) -> None:
        self.collector = Collector(
            sources=[Source(write_key=WRITE_KEY, id="bench")], storage="memory://"
        )
        self._new = 0

    def user(self, users: Literal["new", "returning"]) -> str:
        if users == "returning":
            return f"user-{random.randrange(USERS)}"
        self._new += 1
        return f"new-{uuid.uuid4().hex[:8]}-{self._new}"

    def _prepare(self, path: str, body: bytes) -> Batch:
        route = self.collector.route(path)
        assert route is not None
        prepared = self.collector.prepare(route, Request("POST", path, "", HEADERS, body))
        assert prepared.batch.events and not prepared.batch.rejections, prepared.batch
        return prepared.batch

    def track(self, users: Literal["new", "returning"], sessions: bool = False) -> Batch:
        body = dumps(track_message(self.user(users))).encode()
        return with_sessions(self._prepare("/v1/track", body), sessions)

    def batch(self, users: Literal["new", "returning"], size: int, sessions: bool = False) -> Batch:
        items = [track_message(self.user(users)) for _ in range(size)]
        body = dumps({"batch": items}).encode()
        return with_sessions(self._prepare("/v1/batch", body), sessions)


def with_sessions(batch: Batch, sessions: bool) -> Batch:
    """``batch`` with a 30-minute session on every event, when ``sessions``."""
    if sessions:
        for event in batch.events:
            assert event.identity is not None
            event.session = SessionOp(at=event.identity.at, timeout=1800.0)
    return batch


@dataclass(frozen=True)
class Case:
    name: str
    requests: int  # batches per group
    events: int  # events per batch
    users: Literal["new", "returning"]
    sessions: bool = False


CASES = (
    [
        Case(f"track x{size} {users}", size, 1, users)
        for users in ("new", "returning")
        for size in (1, 25, 100)
    ]
    + [Case(f"batch100 x1 {users}", 1, 100, users) for users in ("new", "returning")]
    + [
        Case("track x25 returning+sessions", 25, 1, "returning", sessions=True),
        Case("batch100 x1 returning+sessions", 1, 100, "returning", sessions=True),
    ]
)


def commit_group(store: SQLiteStore, batches: list[Batch]) -> float:
    """Commit ``batches`` as one group in this thread; its CPU seconds.

    Calls the writer's own group commit directly (not through ``submit``) so that the
    group is exactly these batches and its CPU is this thread's, holding the write lock
    as every writer does. The writer thread stays idle: nothing is submitted to it.
    """
    jobs = []
    for batch in batches:
        commit = Commit()
        commit.set_running_or_notify_cancel()
        jobs.append(Job(batch, commit))
    with store._writes.writing:
        start = time.thread_time()
        store._commit_group(jobs)
        spent = time.thread_time() - start
    for job in jobs:
        job.commit.result(0)  # raises if the group failed
    return spent


def prefill(store: SQLiteStore, requests: Requests, events: int) -> None:
    """``events`` events, every returning user among them, in batches of 100."""
    users = [f"user-{i}" for i in range(USERS)]
    random.shuffle(users)
    made = 0
    while made < events:
        items = []
        for _ in range(100):
            user = users[made] if made < len(users) else f"user-{random.randrange(USERS)}"
            items.append(track_message(user))
            made += 1
        body = dumps({"batch": items}).encode()
        commit_group(store, [requests._prepare("/v1/batch", body)])


def run_case(store: SQLiteStore, requests: Requests, case: Case, events: int) -> float:
    """Commit about ``events`` events as ``case`` says; writer CPU µs per event."""
    groups = max(1, events // (case.requests * case.events))
    spent = 0.0
    for _ in range(groups):
        if case.events == 1:
            batches = [requests.track(case.users, case.sessions) for _ in range(case.requests)]
        else:
            batches = [
                requests.batch(case.users, case.events, case.sessions) for _ in range(case.requests)
            ]
        spent += commit_group(store, batches)
    return spent / (groups * case.requests * case.events) * 1e6


def index_summary(path: Path) -> Iterator[str]:
    with sqlite3.connect(path) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        rows = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        profiles = conn.execute("SELECT count(*) FROM profiles").fetchone()[0]
    yield f"file: {rows:,} events, {profiles:,} profiles, {pages * size / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--events", type=int, help="events per case and round (default 2000)")
    parser.add_argument("--prefill", type=int, help="events stored first (default 50000)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every case")
    parser.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL")
    parser.add_argument("--only", help="run the cases whose name contains this text")
    args = parser.parse_args(argv)
    events = args.events or (200 if args.quick else 2000)
    prefill_events = args.prefill if args.prefill is not None else (2000 if args.quick else 50_000)
    repeat = 1 if args.quick else args.repeat
    cases = [case for case in CASES if args.only is None or args.only in case.name]
    random.seed(6)

    requests = Requests()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        store = SQLiteStore(path, synchronous=args.synchronous)
        try:
            prefill(store, requests, prefill_events)
            print(f"SQLite {sqlite3.sqlite_version}, synchronous={args.synchronous}, WAL;", end=" ")
            print(f"{events} events per case and round, {repeat} round(s)")
            print(*index_summary(path), "after the prefill")
            figures: dict[str, list[float]] = {case.name: [] for case in cases}
            for _ in range(repeat):
                for case in cases:  # round after round: drift hits every case alike
                    figures[case.name].append(run_case(store, requests, case, events))
            print()
            print(f"{'case':31} {'best us/event':>14} {'median':>8}")
            for case in cases:
                rounds = figures[case.name]
                print(f"{case.name:31} {min(rounds):14.1f} {statistics.median(rounds):8.1f}")
            print()
            print(*index_summary(path), "at the end")
        finally:
            store.close()
        requests.collector.close()


if __name__ == "__main__":
    main()
