"""In-process benchmark of a store's writer: CPU (and time) per event of one group commit.

Builds track calls exactly as a request would (the collector's own ``prepare``, the body
``core_pipeline.py`` and ``http_load.py`` send: a random messageId, an order id of its own,
so one order-id claim per event), then commits them through the real
:class:`~fp_collect.store.sqlite.SQLiteStore` on a temporary file, a group at a time, and
reports the CPU time the committing thread spent per event (``time.thread_time``: user
and system time, so the WAL writes count; the fsync's wait does not).

``--store postgres`` commits to the local PostgreSQL instead, in a schema of its own that
is dropped afterwards. The server's CPU is not the committing thread's, so the time per
event (wall clock: round trips and the server's work included) is shown too; and every
case runs twice, alternately in each round: as the writer runs it (set-wise, unless the
group holds a single event) and forced batch at a time (its fallback, which was the only
path before session 6).

Cases: groups of 1 request (Flask under one sync worker: a transaction per request), 25
(a group under Starlette load) and 100 single-event requests, and one ``/v1/batch`` of 100
events; each for new visitors (a profile and an identity made per event) and returning
ones (drawn from the users of the prefill). The ``+sessions`` cases give every event the
session a source with ``session_timeout`` asks for (the Firstparty and user-event APIs):
a returning visitor's latest session is looked up and its ``last_seen`` moved on.

    python benchmarks/store_writer.py                 # about a minute
    python benchmarks/store_writer.py --quick         # a smoke run of a few seconds
    python benchmarks/store_writer.py --synchronous NORMAL --prefill 200000
    python benchmarks/store_writer.py --store postgres --prefill 20000

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import core_pipeline  # beside this script: the same request bodies
from core_pipeline import HEADERS, WRITE_KEY

from fp_collect import Collector, Request, Source
from fp_collect.decoding import dumps
from fp_collect.store.base import Batch, Commit, Job, SessionOp, Store
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


# The writer's group commit: the same method in every store with a writer thread.
WriterStore = Any


def commit_group(store: WriterStore, batches: list[Batch]) -> tuple[float, float]:
    """Commit ``batches`` as one group in this thread; its CPU and wall-clock seconds.

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
        start, started = time.thread_time(), time.perf_counter()
        store._commit_group(jobs)
        spent, took = time.thread_time() - start, time.perf_counter() - started
    for job in jobs:
        job.commit.result(0)  # raises if the group failed
    return spent, took


def prefill(store: WriterStore, requests: Requests, events: int) -> None:
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


def run_case(
    store: WriterStore, requests: Requests, case: Case, events: int
) -> tuple[float, float]:
    """Commit about ``events`` events as ``case`` says; CPU and wall µs per event."""
    groups = max(1, events // (case.requests * case.events))
    spent = took = 0.0
    for _ in range(groups):
        if case.events == 1:
            batches = [requests.track(case.users, case.sessions) for _ in range(case.requests)]
        else:
            batches = [
                requests.batch(case.users, case.events, case.sessions) for _ in range(case.requests)
            ]
        cpu, wall = commit_group(store, batches)
        spent, took = spent + cpu, took + wall
    count = groups * case.requests * case.events
    return spent / count * 1e6, took / count * 1e6


def index_summary(path: Path) -> Iterator[str]:
    with sqlite3.connect(path) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        rows = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        profiles = conn.execute("SELECT count(*) FROM profiles").fetchone()[0]
    yield f"file: {rows:,} events, {profiles:,} profiles, {pages * size / 2**20:.1f} MiB"


@contextmanager
def batch_at_a_time(store: WriterStore) -> Iterator[None]:
    """The PostgreSQL writer without its set-wise path: what its fallback costs (and
    what every group cost before that path existed)."""
    store._commit_set_wise = lambda jobs: None
    try:
        yield
    finally:
        del store._commit_set_wise


@contextmanager
def as_is(store: WriterStore) -> Iterator[None]:
    yield


@contextmanager
def open_writer(args: argparse.Namespace) -> Iterator[tuple[Store, list[str]]]:
    """The store to measure, and lines describing it (after the prefill)."""
    if args.store == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.db"
            store = SQLiteStore(path, synchronous=args.synchronous)
            try:
                yield (
                    store,
                    [
                        f"SQLite {sqlite3.sqlite_version}, synchronous={args.synchronous}, WAL",
                        *index_summary(path),
                    ],
                )
            finally:
                store.close()
        return
    import psycopg

    from fp_collect.store.postgres import PostgresStore

    schema = f"fp_bench_{uuid.uuid4().hex[:12]}"
    separator = "&" if "?" in args.postgres_url else "?"
    postgres = PostgresStore(f"{args.postgres_url}{separator}schema={schema}")
    try:
        with psycopg.connect(args.postgres_url) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        yield postgres, [f"PostgreSQL {version[0] if version else '?'}, schema {schema}"]
    finally:
        postgres.close()
        with psycopg.connect(args.postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--events", type=int, help="events per case and round (default 2000)")
    parser.add_argument("--prefill", type=int, help="events stored first (default 50000)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every case")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--postgres-url", default="postgresql://127.0.0.1:5432/test")
    parser.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL")
    parser.add_argument("--only", help="run the cases whose name contains this text")
    args = parser.parse_args(argv)
    events = args.events or (200 if args.quick else 2000)
    prefill_events = args.prefill if args.prefill is not None else (2000 if args.quick else 50_000)
    repeat = 1 if args.quick else args.repeat
    cases = [case for case in CASES if args.only is None or args.only in case.name]
    paths = {"": as_is}
    if args.store == "postgres":
        paths[" batch at a time"] = batch_at_a_time
    random.seed(6)

    requests = Requests()
    with open_writer(args) as (store, describe):
        prefill(store, requests, prefill_events)
        print(f"{describe[0]}; {events} events per case and round, {repeat} round(s)")
        print(*describe[1:], f"{prefill_events:,} events stored first")
        figures: dict[str, list[tuple[float, float]]] = {
            case.name + path: [] for case in cases for path in paths
        }
        for _ in range(repeat):
            for case in cases:  # round after round: drift hits every case alike
                for path, taken in paths.items():
                    with taken(store):
                        figures[case.name + path].append(run_case(store, requests, case, events))
        print()
        print(f"{'case':47} {'best cpu us/event':>18} {'median':>8} {'best wall us':>13}")
        for name, rounds in figures.items():
            cpu = [cpu for cpu, _ in rounds]
            wall = min(wall for _, wall in rounds)
            print(f"{name:47} {min(cpu):18.1f} {statistics.median(cpu):8.1f} {wall:13.1f}")
    requests.collector.close()


if __name__ == "__main__":
    main()
