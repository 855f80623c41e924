"""What only the SQLite store promises: durability, threads, processes, failure isolation."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fp_collect.errors import ConfigError, StoreUnavailable
from fp_collect.store import DUPLICATE, STORED, Batch, Claim, EventRecord, Outcome, open_store
from fp_collect.store.memory import MemoryStore
from fp_collect.store.sqlite import SCHEMA_VERSION, SQLiteStore

from .groups import (
    THREAD_IDS,
    assert_stored_as_memory,
    held_writer,
    offered_ids_of_batch,
    random_events,
    stored_by_threads,
    writers_of_lone_commits,
)

TIMEOUT = 60  # only guards against a hang; nothing here asserts on time


def event(
    message_id: str, *, payload: object = "{}", claims: tuple[Claim, ...] = ()
) -> EventRecord:
    return EventRecord(
        source_id="src",
        message_id=message_id,
        type="track",
        name="Clicked",
        user_id=None,
        anonymous_id="anon",
        timestamp="2024-05-01T12:00:00Z",
        received_at="2024-05-01T12:00:01Z",
        payload=payload,  # type: ignore[arg-type]
        claims=claims,
    )


def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with SQLiteStore(path) as store:
        assert store.commit(Batch(events=[event("m1"), event("m1")])) == [STORED, DUPLICATE]
    with open_store(f"sqlite:///{path}") as store:
        assert [row.message_id for row in store.events()] == ["m1"]
        assert [row.reason for row in store.rejections()] == ["duplicate_message_id"]
        assert store.commit(Batch(events=[event("m1")])) == [DUPLICATE]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()


def remove_store_files(path: Path) -> None:
    for name in (path.name, path.name + "-wal", path.name + "-shm"):
        (path.parent / name).unlink(missing_ok=True)


@pytest.mark.parametrize("writer", ["writer thread", "caller"])
def test_a_file_removed_while_in_use_is_unavailable_not_written(
    tmp_path: Path, writer: str
) -> None:
    """SQLite would keep committing into the unlinked file: every event answered as
    stored would be lost. The store refuses instead (503), creates nothing at the path,
    and stays unavailable until restarted, even once a file is back at the path."""
    path = tmp_path / "gone.db"
    with SQLiteStore(path) as store:

        def write(message_id: str) -> list[Outcome]:
            batch = Batch(events=[event(message_id)])
            if writer == "caller":
                return store.commit(batch, timeout=5)
            return store.submit(batch).result(timeout=5)

        assert write("before") == [STORED]
        remove_store_files(path)
        for attempt in ("first", "again"):
            with pytest.raises(StoreUnavailable, match="removed or replaced"):
                write(attempt)
            with pytest.raises(StoreUnavailable, match="removed or replaced"):
                list(store.events())
        assert not path.exists(), "neither a write nor a read may create an empty store"
        SQLiteStore(path).close()  # a new store at the path: this one still refuses it
        with pytest.raises(StoreUnavailable, match="restart the collector"):
            write("after")
    with SQLiteStore(path) as restarted:
        assert restarted.commit(Batch(events=[event("restarted")])) == [STORED]
        assert [e.message_id for e in restarted.events()] == ["restarted"]


def test_a_file_replaced_while_in_use_is_neither_written_nor_read(tmp_path: Path) -> None:
    """Left beside the old file, its -wal would be read into the new one: a store keeps
    to the file it opened."""
    path, other = tmp_path / "live.db", tmp_path / "other.db"
    with SQLiteStore(other) as backup:
        backup.commit(Batch(events=[event("in-the-backup")]))
    with SQLiteStore(path) as store:
        assert store.commit(Batch(events=[event("m1")])) == [STORED]
        other.rename(path)  # e.g. a backup moved into place
        with pytest.raises(StoreUnavailable, match="removed or replaced"):
            store.commit(Batch(events=[event("m2")]))
        with pytest.raises(StoreUnavailable, match="removed or replaced"):
            list(store.events())
    for name in (path.name + "-wal", path.name + "-shm"):  # the old file's, now stale
        (path.parent / name).unlink(missing_ok=True)
    with open_store(f"sqlite:///{path}", create=False) as reader:
        assert [e.message_id for e in reader.events()] == ["in-the-backup"]


def test_a_second_store_on_the_file_closed_in_the_same_process_costs_the_first_nothing(
    tmp_path: Path,
) -> None:
    """A report in the host app (``with open_store(url) as store``) beside the collector:
    closing any descriptor of the file would drop the locks of every SQLite connection of
    this process on it (POSIX locks are per process). Another process closing its
    connection would then delete the -wal the collector goes on committing into."""
    path = tmp_path / "shared.db"

    def another_process_reads() -> list[str]:
        code = (
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]);"
            " print(' '.join(sorted(r[0] for r in c.execute('SELECT message_id FROM events'))))"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
        )
        return done.stdout.split()

    with SQLiteStore(path) as collector:
        assert collector.commit(Batch(events=[event("e1")])) == [STORED]
        with open_store(f"sqlite:///{path}", create=False) as report:
            assert [e.message_id for e in report.events()] == ["e1"]
        assert another_process_reads() == ["e1"]
        assert collector.commit(Batch(events=[event("e2")])) == [STORED]
        assert another_process_reads() == ["e1", "e2"]


def test_a_file_that_cannot_be_looked_at_for_a_moment_is_not_lost(tmp_path: Path) -> None:
    """Only a missing or another file is final; an error looking (EIO on a network
    filesystem, say) is a 503 for that write alone."""
    path = tmp_path / "flaky.db"
    real_stat = os.stat
    failing = {"left": 1}

    def stat(target: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if str(target) == str(path) and failing["left"]:
            failing["left"] -= 1
            raise OSError(5, "Input/output error")
        return real_stat(target, *args, **kwargs)

    with SQLiteStore(path) as store:
        with mock.patch("os.stat", stat):
            with pytest.raises(StoreUnavailable, match="cannot look at"):
                store.commit(Batch(events=[event("m1")]))
            assert store.commit(Batch(events=[event("m2")])) == [STORED]
        assert [e.message_id for e in store.events()] == ["m2"]


def test_a_relative_path_survives_a_change_of_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    with SQLiteStore("events.db") as store:
        assert store.commit(Batch(events=[event("m1")])) == [STORED]
        monkeypatch.chdir(tmp_path / "elsewhere")
        assert store.commit(Batch(events=[event("m2")])) == [STORED]
        assert [e.message_id for e in store.events()] == ["m1", "m2"]
    assert not (tmp_path / "elsewhere" / "events.db").exists()


@pytest.mark.parametrize("committing", ["none", "half"])
def test_threads_store_each_message_id_once(tmp_path: Path, committing: str) -> None:
    """Eight threads write the same 200 message ids; with ``half``, every other thread
    calls commit(), written in its own thread when nobody else is writing."""
    with SQLiteStore(tmp_path / "t.db", synchronous="NORMAL") as store:
        assert stored_by_threads(store, event, committing, TIMEOUT) == Counter(THREAD_IDS)
        assert sorted(row.message_id for row in store.events()) == sorted(THREAD_IDS)
        assert len(list(store.rejections())) == 7 * 200


def test_a_lone_commit_is_written_in_the_calling_thread(tmp_path: Path) -> None:
    """Flask under a sync worker: no hand-over to the writer thread and back."""
    with SQLiteStore(tmp_path / "t.db") as store:
        writers = writers_of_lone_commits(store, event, TIMEOUT)
        assert [row.message_id for row in store.events()] == ["m1"]
    assert writers == [threading.current_thread().name] * 2


def test_commits_during_a_write_share_the_next_group(tmp_path: Path) -> None:
    """gthread workers: callers arriving while a write is under way must not each take
    a transaction of their own after it, but join the writer thread's next group."""
    with SQLiteStore(tmp_path / "t.db") as store:
        groups: list[int] = []
        original = store._commit_group

        def recording(group: Any) -> None:
            groups.append(len(group))
            original(group)

        with ThreadPoolExecutor(6) as pool:
            with held_writer(store):  # the writer thread is inside a write, holding the lock
                store._commit_group = recording  # type: ignore[method-assign]
                pending = [
                    pool.submit(store.commit, Batch(events=[event(f"m{i}")]), TIMEOUT)
                    for i in range(6)
                ]
                deadline = time.monotonic() + TIMEOUT  # until all six wait in the queue
                while store._writes._queue.qsize() < 6 and time.monotonic() < deadline:
                    time.sleep(0.01)
            assert [future.result(TIMEOUT) for future in pending] == [[STORED]] * 6
        assert groups == [6]


def test_commit_after_close_raises(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    assert store.commit(Batch(events=[event("m1")]), TIMEOUT) == [STORED]
    store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        store.commit(Batch(events=[event("m2")]), TIMEOUT)


def _worker(path: str, worker: int, barrier: Barrier, results: Queue[list[Outcome]]) -> None:
    with SQLiteStore(path) as store:
        barrier.wait(TIMEOUT)
        outcomes: list[Outcome] = []
        for n in range(0, 100, 10):
            shared = [event(f"m{i}") for i in range(n, n + 10)]
            # Distinct message ids, same claims: only the claim can refuse these.
            claimed = [
                event(f"w{worker}-{i}", claims=(Claim("order_id", f"o{i}", at=1.0),))
                for i in range(n, n + 10)
            ]
            outcomes += store.commit(Batch(events=shared + claimed), TIMEOUT)
        results.put(outcomes)


def test_two_processes_share_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Spawned children unpickle _worker by module name; under --import-mode=importlib
    # that name is not importable unless its root is on sys.path (children inherit it).
    monkeypatch.syspath_prepend(Path(__file__).parents[__name__.count(".")])
    path = str(tmp_path / "t.db")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results: Queue[list[Outcome]] = ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(path, n, barrier, results)) for n in range(2)]
    for process in workers:
        process.start()
    outcomes = [results.get(timeout=TIMEOUT) for _ in workers]
    for process in workers:
        process.join(TIMEOUT)
        assert process.exitcode == 0
    counts = Counter(outcome for worker in outcomes for outcome in worker)
    assert counts == {STORED: 200, DUPLICATE: 100, Outcome(False, "order_id"): 100}
    with SQLiteStore(path) as store:
        stored = [row.message_id for row in store.events()]
    assert sorted(m for m in stored if m.startswith("m")) == sorted(f"m{i}" for i in range(100))
    assert len(stored) == len(set(stored)) == 200
    won = Counter(m.split("-")[1] for m in stored if m.startswith("w"))
    assert won == Counter(str(i) for i in range(100))


def _hold_write_lock(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


@contextmanager
def writer_elsewhere(path: Path, release: threading.Event) -> Iterator[None]:
    """Another process's writer holding the file's write lock until ``release`` is set,
    or for 10 s at most: well within a busy timeout of TIMEOUT, so a commit that waits
    for the lock gets it, rather than giving up at the same moment."""
    taken = threading.Event()

    def hold() -> None:
        with closing(_hold_write_lock(path)) as other:
            taken.set()
            release.wait(10)
            other.execute("ROLLBACK")

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert taken.wait(TIMEOUT)
        yield
    finally:
        release.set()
        thread.join(TIMEOUT)


def test_a_blocking_commit_waits_for_another_writers_lock_no_longer_than_its_timeout(
    tmp_path: Path,
) -> None:
    """commit() writes in its caller's thread, so SQLite's busy timeout (here a minute)
    would be the caller's wait: the caller's own timeout bounds it instead. The other
    writer lets go only when that commit has given up, or after 10 s: a commit that
    waited for it would succeed."""
    path = tmp_path / "t.db"
    with SQLiteStore(path, busy_timeout=TIMEOUT) as store:
        release = threading.Event()
        with writer_elsewhere(path, release):
            with pytest.raises(StoreUnavailable, match="locked"):
                store.commit(Batch(events=[event("m1")]), timeout=0.2)
            release.set()
        assert store.commit(Batch(events=[event("m1")]), timeout=0.2) == [STORED]
        # That commit's shorter wait was for it alone: the writer thread still waits out
        # a lock held longer than 0.2 s.
        release = threading.Event()
        with writer_elsewhere(path, release):
            pending = store.submit(Batch(events=[event("m2")]))
            threading.Timer(1.0, release.set).start()
            assert pending.result(TIMEOUT) == [STORED]


def test_a_failing_batch_fails_alone(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with SQLiteStore(path) as store:
        # While another connection holds the write lock the writer cannot commit, so
        # both batches below are queued together and land in the same group.
        blocker = _hold_write_lock(path)
        bad = store.submit(Batch(events=[event("ok-too"), event("bad", payload=object())]))
        good = store.submit(Batch(events=[event("good")]))
        blocker.execute("ROLLBACK")
        blocker.close()
        with pytest.raises(StoreUnavailable) as raised:
            bad.result(TIMEOUT)
        assert isinstance(raised.value.__cause__, sqlite3.Error)
        assert good.result(TIMEOUT) == [STORED]
        assert [row.message_id for row in store.events()] == ["good"]


def test_commit_failure_fails_the_group_and_the_writer_recovers(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with SQLiteStore(path, busy_timeout=0.01) as store:
        blocker = _hold_write_lock(path)
        first, second = store.submit(Batch(events=[event("m1")])), store.submit(Batch())
        for future in (first, second):
            with pytest.raises(StoreUnavailable, match="locked"):
                future.result(TIMEOUT)
        blocker.execute("ROLLBACK")
        blocker.close()
        assert store.commit(Batch(events=[event("m1")]), TIMEOUT) == [STORED]


def test_close_drains_then_submit_raises(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    futures = [store.submit(Batch(events=[event(f"m{i}")])) for i in range(50)]
    store.close()
    assert all(future.result(0) == [STORED] for future in futures)
    with pytest.raises(StoreUnavailable, match="closed"):
        store.submit(Batch())
    store.close()


def test_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        SQLiteStore(tmp_path / "t.db", synchronous="OFF")  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable):
        SQLiteStore(tmp_path / "missing-dir" / "t.db")


def _writer_statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement the stores' connections run from now on."""
    statements: list[str] = []
    connect = SQLiteStore._connect

    def traced(self: SQLiteStore, *, create: bool = False) -> sqlite3.Connection:
        conn = connect(self, create=create)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(SQLiteStore, "_connect", traced)
    return statements


@pytest.mark.parametrize(
    ("query", "expected"),
    [("", "FULL"), ("?synchronous=NORMAL", "NORMAL"), ("?synchronous=full", "FULL")],
)
def test_the_url_chooses_synchronous_and_full_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, query: str, expected: str
) -> None:
    statements = _writer_statements(monkeypatch)
    with open_store(f"sqlite:///{tmp_path / 'u.db'}{query}") as store:
        assert store.commit(Batch(events=[event("m1")]), TIMEOUT) == [STORED]
    assert f"PRAGMA synchronous = {expected}" in statements
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".db"] == ["u.db"]


@pytest.mark.parametrize(
    "query", ["?synchronous=OFF", "?synchronous=", "?journal_mode=MEMORY", "?synchronous"]
)
def test_other_url_options_are_refused(tmp_path: Path, query: str) -> None:
    with pytest.raises(ConfigError):
        open_store(f"sqlite:///{tmp_path / 'u.db'}{query}")


def test_a_version_1_file_is_migrated_in_place(tmp_path: Path) -> None:
    from fp_collect.store.sqlite.sql import SCHEMA

    path = tmp_path / "v1.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(SCHEMA)  # exactly what version 1 created
        conn.execute(
            "INSERT INTO events (source_id, message_id, type, name, user_id, anonymous_id,"
            " timestamp, received_at, payload) VALUES ('src', 'old', 'track', 'E', 'u', NULL,"
            " '2024-01-01T00:00:00.000Z', '2024-01-01T00:00:00.000Z', '{}')"
        )
    with SQLiteStore(path) as store:
        (old,) = store.events()
        assert (old.message_id, old.profile_id, old.session_id) == ("old", None, None)
        assert store.commit(Batch(events=[event("old"), event("new")])) == [DUPLICATE, STORED]
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_identities_resolve_alike_in_one_group_and_one_by_one(tmp_path: Path) -> None:
    """The writer remembers owners and merges within a transaction: a group holding
    merges, and a batch rolled back after attaching an identity, must resolve exactly as
    the same batches committed one at a time."""
    from fp_collect.store.base import Identity, IdentityOp
    from fp_collect.store.memory import MemoryStore

    def with_identity(
        message_id: str, *names: str, payload: object = "{}", **op: object
    ) -> EventRecord:
        identities = tuple(Identity("anonymous_id", name) for name in names)
        fields: dict[str, object] = {"scope": "ws", "at": 1.0, "identities": identities}
        fields.update(new_profile_id=f"PR-{message_id}", **op)
        record = event(message_id, payload=payload)
        record.identity = IdentityOp(**fields)  # type: ignore[arg-type]
        return record

    batches = [
        Batch(events=[with_identity("m1", "a")]),
        Batch(events=[with_identity("m2", "b")]),
        # attaches "c" to a's profile, then fails: "c" must be unknown again afterwards
        Batch(events=[with_identity("m3", "a", "c"), event("bad", payload=object())]),
        Batch(events=[with_identity("m4", "c")]),
        Batch(events=[with_identity("m5", "a", "b", merge=True)]),
        Batch(events=[with_identity("m6", "b"), with_identity("m7", "c", "a", merge=True)]),
    ]
    reference = MemoryStore()  # SQLite refuses the bad payload; leave its batch out here
    expected = [None if i == 2 else reference.commit(b, TIMEOUT) for i, b in enumerate(batches)]
    path = tmp_path / "t.db"
    with SQLiteStore(path) as store:
        blocker = _hold_write_lock(path)  # so that every batch lands in one group
        futures = [store.submit(batch) for batch in batches]
        blocker.execute("ROLLBACK")
        blocker.close()
        got: list[list[Outcome] | None] = []
        for future in futures:
            try:
                got.append(future.result(TIMEOUT))
            except StoreUnavailable:
                got.append(None)
        assert got == expected
        sixth = got[5]
        assert sixth is not None
        assert [sixth[0].profile_id, sixth[1].profile_id] == ["PR-m1", "PR-m1"]
        for profile_id in ("PR-m1", "PR-m2", "PR-m4"):
            assert store.profile(profile_id) == reference.profile(profile_id)


def test_duplicates_are_found_within_one_group(tmp_path: Path) -> None:
    """The writer looks a group's message ids up at once: ids stored before the group,
    repeated within a batch, or written earlier in the group by a batch with claims
    (written one event at a time) are all duplicates."""
    path = tmp_path / "t.db"
    claim = Claim("order_id", "o-1", at=1.0)
    with SQLiteStore(path) as store:
        assert store.commit(Batch(events=[event("m1")]), TIMEOUT) == [STORED]
        blocker = _hold_write_lock(path)  # so that every batch lands in one group
        futures = [
            store.submit(Batch(events=[event("m1")])),
            store.submit(Batch(events=[event("m2"), event("m2")])),
            store.submit(Batch(events=[event("m3", claims=(claim,))])),
            store.submit(Batch(events=[event("m3"), event("m4")])),
        ]
        blocker.execute("ROLLBACK")
        blocker.close()
        assert [future.result(TIMEOUT) for future in futures] == [
            [DUPLICATE],
            [STORED, DUPLICATE],
            [STORED],
            [DUPLICATE, STORED],
        ]
        assert [row.message_id for row in store.events()] == ["m1", "m2", "m3", "m4"]
        assert [r.reason for r in store.rejections()] == ["duplicate_message_id"] * 3


def test_claims_are_decided_within_one_group_as_one_at_a_time(tmp_path: Path) -> None:
    """The writer looks a group's claims up at once and remembers what it writes: a claim
    held before the group, or taken earlier in it (by another batch or the same one),
    blocks; an expired window does not; a duplicate stays a duplicate; a refused event
    takes no claim."""
    before = [
        Batch(events=[event("pre-1", claims=(Claim("order_id", "o-pre", at=1.0),))]),
        Batch(events=[event("pre-2", claims=(Claim("open", "e", at=1.0, until=100.0),))]),
    ]
    order = Claim("order_id", "o-1", at=1.0)
    group = [
        Batch(events=[event("m1", claims=(order,))]),
        Batch(events=[event("m2", claims=(order,))]),  # held: taken by m1 just before
        Batch(events=[event("m1", claims=(order,))]),  # a duplicate first, though held too
        Batch(events=[event("m3", claims=(Claim("order_id", "o-pre", at=5.0),))]),
        Batch(events=[event("m4", claims=(Claim("open", "e", at=200.0, until=300.0),))]),
        Batch(events=[event("m5", claims=(Claim("open", "e", at=250.0, until=350.0),))]),
        Batch(
            events=[
                event("m6", claims=(Claim("order_id", "o-2", at=1.0),)),
                event("m7", claims=(Claim("order_id", "o-2", at=1.0),)),
                event("m2", claims=(Claim("order_id", "o-3", at=1.0),)),  # m2 was refused
                event("m8", claims=(Claim("order_id", "o-3", at=1.0),)),
            ]
        ),
    ]
    reference = MemoryStore()
    for batch in before:
        reference.commit(batch)
    expected = [reference.commit(batch) for batch in group]
    assert expected == [
        [STORED],
        [Outcome(False, "order_id")],
        [DUPLICATE],
        [Outcome(False, "order_id")],
        [STORED],
        [Outcome(False, "open")],
        [STORED, Outcome(False, "order_id"), STORED, Outcome(False, "order_id")],
    ]
    with SQLiteStore(tmp_path / "t.db") as store:
        for batch in before:
            store.commit(batch, TIMEOUT)
        with held_writer(store):
            commits = [store.submit(batch) for batch in group]
        assert [commit.result(TIMEOUT) for commit in commits] == expected
        assert [e.message_id for e in store.events()] == [e.message_id for e in reference.events()]
        assert [r.reason for r in store.rejections()] == [r.reason for r in reference.rejections()]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(random_events(), min_size=1, max_size=4))
def test_a_group_of_batches_decides_like_the_memory_store_one_by_one(
    batches: list[list[EventRecord]],
) -> None:
    """The writer decides a group set-wise (dedup, claims and owners looked up at once;
    events, claims, new profiles and identities inserted at the end): the result must be
    what committing its batches one at a time gives, and none of these batches may need
    the one-event-at-a-time redo kept for a batch that fails."""
    batches = [offered_ids_of_batch(number, events) for number, events in enumerate(batches)]
    memory = MemoryStore()
    expected = [memory.commit(Batch(events=list(events))) for events in batches]
    with (
        tempfile.TemporaryDirectory() as tmp,
        SQLiteStore(Path(tmp) / "t.db") as store,
        mock.patch.object(store, "_apply_in_savepoint", wraps=store._apply_in_savepoint) as redo,
    ):
        with held_writer(store):
            commits = [store.submit(Batch(events=list(events))) for events in batches]
        assert [commit.result(TIMEOUT) for commit in commits] == expected
        assert redo.call_count == 0
        assert_stored_as_memory(store, memory, expected)


def test_a_reader_creates_no_file_and_opens_only_a_store(tmp_path: Path) -> None:
    """``open_store(url, create=False)``, what a reporting job uses, changes nothing."""
    missing = tmp_path / "missing.db"
    with pytest.raises(ConfigError, match="no SQLite store"):
        open_store(f"sqlite:///{missing}", create=False)
    assert not missing.exists()
    other = tmp_path / "other.db"
    with closing(sqlite3.connect(other)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE notes (text TEXT)")
    before = other.read_bytes()
    with pytest.raises(ConfigError, match="holds no fp-collect store"):
        open_store(f"sqlite:///{other}", create=False)
    assert other.read_bytes() == before
    existing = tmp_path / "events.db"
    writer = open_store(f"sqlite:///{existing}")
    writer.commit(Batch(events=[event("m-1")]))
    writer.close()
    reader = open_store(f"sqlite:///{existing}", create=False)
    assert [e.message_id for e in reader.events()] == ["m-1"]
    reader.close()
    # Not even the -wal and -shm files a read-only connection would leave behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.db", "other.db"]


def test_a_reader_of_an_older_file_migrates_and_converts_nothing(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    open_store(f"sqlite:///{path}").close()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("UPDATE schema_version SET version = 3")
        conn.commit()
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="schema version 3"):
        open_store(f"sqlite:///{path}", create=False)
    assert path.read_bytes() == before
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)


def test_a_new_file_is_private_to_its_owner(tmp_path: Path) -> None:
    """It holds email addresses, IP addresses and traits: owner-only (0600) whatever the
    umask, -wal and -shm alike. A file that exists keeps the permissions it has."""
    old_umask = os.umask(0o022)
    try:
        for umask in (0o022, 0o000):
            os.umask(umask)
            with SQLiteStore(tmp_path / f"new{umask}.db") as store:
                store.commit(Batch(events=[event("m-1")]))
                stem = f"new{umask}"
                modes = {
                    p.name[len(stem) :]: stat.S_IMODE(p.stat().st_mode)
                    for p in tmp_path.glob(f"{stem}.db*")
                }
            assert modes == {".db": 0o600, ".db-wal": 0o600, ".db-shm": 0o600}, umask
        shared = tmp_path / "shared.db"
        shared.touch(mode=0o640)
        with SQLiteStore(shared):
            assert stat.S_IMODE(shared.stat().st_mode) == 0o640
    finally:
        os.umask(old_umask)
