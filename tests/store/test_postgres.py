"""What only the PostgreSQL store promises: a shared schema, exactness across processes,
failure isolation, and riding out outages of the server.

Every test works in a schema of its own on the shared server (``pg_schema``). Outages
are simulated with the ``tcp_proxy`` fixture, never by touching the server.
"""

from __future__ import annotations

import logging
import multiprocessing
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, cast
from unittest import mock
from urllib.parse import urlsplit

import psycopg
import pytest

from fp_collect import Collector, Source
from fp_collect.errors import ConfigError, StoreUnavailable
from fp_collect.store import DUPLICATE, STORED, Batch, Claim, EventRecord, Outcome, open_store
from fp_collect.store.base import (
    Identity,
    IdentityOp,
    Pending,
    Query,
    RejectionRecord,
    SessionOp,
    Store,
)
from fp_collect.store.postgres import SCHEMA_VERSION, PostgresStore, parse_url
from fp_collect.store.postgres.sql import MIGRATIONS, Connection
from fp_collect.store.postgres.watchdog import Watchdog

from .groups import THREAD_IDS, stored_by_threads, writers_of_lone_commits

TIMEOUT = 60  # only guards against a hang; nothing here asserts on time

Job = tuple[list[str], "Future[list[Outcome]]"]


def event(
    message_id: str,
    *,
    payload: object = "{}",
    claims: tuple[Claim, ...] = (),
    identity: IdentityOp | None = None,
    session: SessionOp | None = None,
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
        identity=identity,
        session=session,
    )


def visitor(anonymous_id: str, new_profile_id: str = "") -> IdentityOp:
    identity = Identity("anonymous_id", anonymous_id)
    return IdentityOp(scope="ws", at=100.0, identities=(identity,), new_profile_id=new_profile_id)


def with_query(url: str, **params: object) -> str:
    query = "&".join(f"{name}={value}" for name, value in params.items())
    return f"{url}{'&' if '?' in url else '?'}{query}"


@pytest.fixture
def pg_url(postgres_dsn: str, pg_schema: str) -> str:
    return with_query(postgres_dsn, schema=pg_schema)


def scalar(dsn: str, sql: str, params: tuple[object, ...] = ()) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql, params).fetchone()
        return None if row is None else row[0]


def waiting_on_locks(dsn: str, schema: str) -> int:
    """Sessions waiting for a lock while running a statement on ``schema``."""
    return int(
        scalar(
            dsn,
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND query LIKE %s",
            (f'%"{schema}".%',),
        )
    )


def wait_until_blocked(dsn: str, schema: str, unless: Pending | None = None) -> None:
    """Until a session is waiting for a lock while running a statement on ``schema``
    (or ``unless`` is done: the writer did not wait, and the test will say what it did)."""
    deadline = time.monotonic() + TIMEOUT
    while not waiting_on_locks(dsn, schema):
        if unless is not None and unless.done():
            return
        assert time.monotonic() < deadline, "the writer never blocked"
        time.sleep(0.02)


@contextmanager
def uncommitted(dsn: str, schema: str, *statements: str) -> Iterator[psycopg.Connection[Any]]:
    """A transaction that ran ``statements`` (``{s}`` is the schema) and stays open,
    holding its locks, until the block ends with COMMIT (or ROLLBACK when it raises)."""
    with psycopg.connect(dsn) as conn:
        for statement in statements:
            conn.execute(statement.replace("{s}", f'"{schema}"'))
        yield conn


# -- schema, options ----------------------------------------------------------------------


def test_schema_is_created_once_versioned_and_kept(postgres_dsn: str, pg_schema: str) -> None:
    url = with_query(postgres_dsn, schema=pg_schema)
    start = threading.Barrier(6)
    opened: list[PostgresStore] = []

    def open_at_once() -> None:
        start.wait(TIMEOUT)
        opened.append(PostgresStore(url))

    # Six stores (six sessions) creating the same new schema at the same moment.
    threads = [threading.Thread(target=open_at_once) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert len(opened) == 6
    assert opened[0].commit(Batch(events=[event("m1")])) == [STORED]
    assert opened[1].commit(Batch(events=[event("m1")])) == [DUPLICATE]
    for each in opened:
        each.close()
    with psycopg.connect(postgres_dsn) as conn:
        versions = conn.execute(f'SELECT version FROM "{pg_schema}".schema_version').fetchall()
        assert versions == [(SCHEMA_VERSION,)]
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (pg_schema,),
        ).fetchall()
    assert {name for (name,) in tables} == {
        "schema_version", "events", "rejections", "claims", "profiles", "identities", "sessions"
    }  # fmt: skip
    # Reopened (by the other scheme name): the data is there and dedup still holds.
    with open_store(url.replace("postgresql://", "postgres://", 1)) as store:
        assert [row.message_id for row in store.events()] == ["m1"]
        assert [row.reason for row in store.rejections()] == ["duplicate_message_id"]
        assert store.commit(Batch(events=[event("m1"), event("m2")])) == [DUPLICATE, STORED]


def test_a_newer_schema_version_is_refused(postgres_dsn: str, pg_url: str, pg_schema: str) -> None:
    PostgresStore(pg_url).close()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'UPDATE "{pg_schema}".schema_version SET version = 99')
    with pytest.raises(ConfigError, match="version 99"):
        PostgresStore(pg_url)


def test_url_options_are_read_and_the_rest_passed_on_unchanged() -> None:
    options = parse_url(
        "postgresql://u:p%40ss@db:5433/site?sslmode=disable&schema=my%20schema"
        "&pool_size=2&statement_timeout=0.5&connect_timeout=3&options=-c%20x%3Dy"
    )
    assert options.conninfo == (
        "postgresql://u:p%40ss@db:5433/site?sslmode=disable&connect_timeout=3&options=-c%20x%3Dy"
    )
    assert (options.schema, options.pool_size) == ("my schema", 2)
    assert (options.statement_timeout, options.connect_timeout) == (0.5, 3)
    assert "connect_timeout" not in dict(options.defaults)
    plain = parse_url("postgres://db/site")
    assert (plain.conninfo, plain.schema, plain.pool_size) == (
        "postgres://db/site",
        "fp_collect",
        4,
    )
    assert plain.statement_timeout == 5.0
    for bad in ("pool_size=0", "pool_size=x", "statement_timeout=-1", "statement_timeout=nan",
                "schema=", "schema=pg_x", f"schema={'x' * 64}"):  # fmt: skip
        with pytest.raises(ConfigError):
            parse_url(f"postgresql://db/site?{bad}")
    # Whatever is not ours goes to libpq, which still refuses a misspelt option.
    with pytest.raises(ConfigError, match="schem"):
        parse_url("postgresql://db/site?schem=x")


def test_open_store_names_the_extra_when_the_driver_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ConfigError, match=r"pip install 'fp-collect\[postgres\]'"):
        open_store("postgresql://127.0.0.1/test")
    with pytest.raises(ConfigError, match="postgresql://"):
        open_store("mysql://127.0.0.1/test")


def test_an_unreachable_server_at_open_is_store_unavailable_for_a_reader() -> None:
    with socket.create_server(("127.0.0.1", 0)) as unused:
        port = unused.getsockname()[1]
    with pytest.raises(StoreUnavailable):
        PostgresStore(f"postgresql://127.0.0.1:{port}/test?connect_timeout=2", create=False)


@pytest.mark.parametrize(
    "change",
    [
        {"path": "/no_such_database_here"},
        {"user": "no_such_role_here"},
        {"query": "sslmode=bogus"},
    ],
    ids=["database", "role", "option"],
)
def test_a_url_the_server_refuses_still_fails_at_open(
    postgres_dsn: str, change: dict[str, str]
) -> None:
    """Only an outage is waited out at start-up: a wrong database, role or option is a
    configuration error, found when the app starts (waiting would never mend it)."""
    parts = urlsplit(postgres_dsn)
    if "user" in change:
        parts = parts._replace(netloc=f"{change['user']}@{parts.hostname}:{parts.port or 5432}")
    if "path" in change:
        parts = parts._replace(path=change["path"])
    if "query" in change:
        parts = parts._replace(query=change["query"])
    with pytest.raises(StoreUnavailable):
        PostgresStore(parts.geturl())


def test_a_collector_store_opens_without_its_server_and_starts_when_it_is_back(
    postgres_dsn: str, pg_schema: str, tcp_proxy: Callable[[str, int], Any]
) -> None:
    """The host app must start while its database is away: writes and reads fail as
    unavailable (503) until the server is back, then the schema is made and all works."""
    proxy = proxied(tcp_proxy, postgres_dsn)
    proxy.cut()
    url = with_query(proxy.url(postgres_dsn), schema=pg_schema, **OUTAGE_OPTIONS)
    with PostgresStore(url) as store:
        with pytest.raises(StoreUnavailable):
            store.commit(Batch(events=[event("m-away")]), timeout=5)
        with pytest.raises(StoreUnavailable):
            list(store.events())
        assert scalar(postgres_dsn, "SELECT to_regnamespace(%s)::text", (pg_schema,)) is None
        proxy.restore()
        assert store.commit(Batch(events=[event("m-back")]), timeout=10) == [STORED]
        assert [e.message_id for e in store.events()] == ["m-back"]


# -- exactness ----------------------------------------------------------------------------


# A batch of one event is written batch at a time; a second, unrelated event (a
# "companion") sends it down the set-wise path (store/postgres/group.py) instead.
PATHS = pytest.mark.parametrize("companion", [False, True], ids=["one event", "set-wise"])


def along(companion: bool, *events: EventRecord) -> list[EventRecord]:
    """``events``, and a companion event when ``companion``, so that both paths are run;
    its outcome is the last."""
    return [*events, event(f"companion-{events[0].message_id}")] if companion else [*events]


def test_a_lone_event_of_a_returning_visitor_takes_six_statements(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flask under a sync worker commits one event at a time: BEGIN, is it stored, who
    owns the identity, lock the profile, INSERT, COMMIT. The owner is asked once, though
    resolution asks for it twice (before choosing the profile, and before attaching)."""
    with PostgresStore(pg_url) as store:
        store.commit(Batch(events=[event("m1", identity=visitor("a"))]), TIMEOUT)
        sent: list[str] = []
        execute = psycopg.Cursor.execute

        def counted(cursor: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            sent.append(str(query).split()[0])
            return execute(cursor, query, *args, **kwargs)

        monkeypatch.setattr(psycopg.Cursor, "execute", counted)
        [outcome] = store.commit(Batch(events=[event("m2", identity=visitor("a"))]), TIMEOUT)
    assert outcome.stored
    assert sent == ["BEGIN", "SELECT", "SELECT", "SELECT", "INSERT", "COMMIT"]


@PATHS
def test_nul_and_the_escape_character_round_trip_everywhere(pg_url: str, companion: bool) -> None:
    weird = "a\x00b\uffff0c\uffff\uffff\x00"
    record = event(weird, payload=f'{{"raw": "{weird}"}}', identity=visitor(weird))
    rejection = RejectionRecord("src", "invalid_json", weird, "2024", "/v1/t", weird, 1, weird)
    with PostgresStore(pg_url) as store:
        outcome, *_ = store.commit(Batch(events=along(companion, record), rejections=[rejection]))
        assert outcome.stored
        # Its own companion would be a duplicate too: a fresh one keeps the rejections.
        again = [event(weird), *([event("companion-again")] if companion else [])]
        refused, *_ = store.commit(Batch(events=again))
        assert refused == DUPLICATE
        assert store.redone_groups == 0
        row, *_ = store.events()
        assert (row.message_id, row.payload) == (weird, record.payload)
        [kept, duplicate] = store.rejections()
        assert (kept.message, kept.payload, kept.message_id) == (weird, weird, weird)
        assert duplicate.message_id == weird
        assert outcome.profile_id is not None
        profile = store.profile(outcome.profile_id)
        assert profile is not None and profile.identities == (Identity("anonymous_id", weird),)


@pytest.mark.parametrize("committing", ["none", "half"])
def test_threads_store_each_message_id_once(pg_url: str, committing: str) -> None:
    """Eight threads write the same 200 message ids; with ``half``, every other thread
    calls commit(), written in its own thread when nobody else is writing."""
    with PostgresStore(pg_url) as store:
        assert stored_by_threads(store, event, committing, TIMEOUT) == Counter(THREAD_IDS)
        assert sorted(row.message_id for row in store.events()) == sorted(THREAD_IDS)
        assert len(list(store.rejections())) == 7 * 200


def test_a_lone_commit_is_written_in_the_calling_thread(pg_url: str) -> None:
    """Flask under a sync worker: no hand-over to the writer thread and back."""
    with PostgresStore(pg_url) as store:
        writers = writers_of_lone_commits(store, event, TIMEOUT)
    assert writers == [threading.current_thread().name] * 2


def test_a_failing_batch_fails_alone(postgres_dsn: str, pg_url: str, pg_schema: str) -> None:
    with PostgresStore(pg_url) as store:
        # An uncommitted copy of "blocker" makes the writer wait on its first group, so
        # the three batches below are queued meanwhile and land in one group together.
        with uncommitted(
            postgres_dsn, pg_schema,
            "INSERT INTO {s}.events (source_id, message_id, type, timestamp, received_at,"
            " payload) VALUES ('src', 'blocker', 'track', '', '', '{}')",
        ) as blocker:  # fmt: skip
            first = store.submit(Batch(events=[event("blocker")]))
            wait_until_blocked(postgres_dsn, pg_schema)
            # Refused by psycopg before it is sent, and by the server (bigint overflow).
            bad_client = store.submit(Batch(events=[event("ok-1"), event("x", payload=object())]))
            too_big = RejectionRecord("src", "r", "m", "t", "/", "{}", index=2**70)
            bad_server = store.submit(Batch(events=[event("ok-2")], rejections=[too_big]))
            good = store.submit(Batch(events=[event("good")]))
            blocker.rollback()
        assert first.result(TIMEOUT) == [STORED]
        for bad in (bad_client, bad_server):
            with pytest.raises(StoreUnavailable, match="batch not stored") as raised:
                bad.result(TIMEOUT)
            assert isinstance(raised.value.__cause__, psycopg.Error)
        assert good.result(TIMEOUT) == [STORED]
        assert [row.message_id for row in store.events()] == ["blocker", "good"]
        assert list(store.rejections()) == []


def test_a_lone_failing_batch_stores_nothing_and_the_next_commit_works(
    postgres_dsn: str, pg_url: str, pg_schema: str
) -> None:
    """A group of one batch runs without a savepoint: its failure rolls back everything
    it did (its good event and new profile too), and the connection goes on."""
    too_big = RejectionRecord("src", "r", "m", "t", "/", "{}", index=2**70)
    with PostgresStore(pg_url) as store:
        for bad in (
            # Refused by psycopg before it is sent, and by the server (bigint overflow).
            Batch(events=[event("ok-1", identity=visitor("v1")), event("x", payload=object())]),
            Batch(events=[event("ok-2", identity=visitor("v2"))], rejections=[too_big]),
        ):
            with pytest.raises(StoreUnavailable, match="batch not stored"):
                store.commit(bad, TIMEOUT)
        [outcome] = store.commit(Batch(events=[event("ok-1", identity=visitor("v1"))]), TIMEOUT)
        assert outcome.stored
        assert [row.message_id for row in store.events()] == ["ok-1"]
        assert list(store.rejections()) == []
    assert scalar(postgres_dsn, f'SELECT count(*) FROM "{pg_schema}".profiles') == 1


def test_a_future_cancelled_before_the_writer_takes_it_is_not_written(
    postgres_dsn: str, pg_url: str, pg_schema: str
) -> None:
    with PostgresStore(pg_url) as store:
        with uncommitted(
            postgres_dsn, pg_schema,
            "INSERT INTO {s}.events (source_id, message_id, type, timestamp, received_at,"
            " payload) VALUES ('src', 'blocker', 'track', '', '', '{}')",
        ) as blocker:  # fmt: skip
            first = store.submit(Batch(events=[event("blocker")]))
            wait_until_blocked(postgres_dsn, pg_schema)
            cancelled = store.submit(Batch(events=[event("cancelled")]))
            assert cancelled.cancel()
            kept = store.submit(Batch(events=[event("kept")]))
            blocker.rollback()
        assert first.result(TIMEOUT) == kept.result(TIMEOUT) == [STORED]
        assert [row.message_id for row in store.events()] == ["blocker", "kept"]


@PATHS
def test_a_lost_identity_race_is_redone_and_joins_the_winner(
    postgres_dsn: str, pg_url: str, pg_schema: str, companion: bool
) -> None:
    with PostgresStore(pg_url) as store:
        # Another process is creating visitor a-1's profile and has not committed: the
        # writer sees no owner, creates its own profile, and waits on the identity key.
        with uncommitted(
            postgres_dsn, pg_schema,
            "INSERT INTO {s}.profiles VALUES ('PR-theirs', 'ws', 1, '{}', NULL)",
            "INSERT INTO {s}.identities VALUES ('ws', 'anonymous_id', 'a-1', 'PR-theirs')",
        ):  # fmt: skip
            mine = event("m1", identity=visitor("a-1", "PR-mine"))
            future = store.submit(Batch(events=along(companion, mine)))
            wait_until_blocked(postgres_dsn, pg_schema)
        outcome, *others = future.result(TIMEOUT)
        assert (outcome.stored, outcome.profile_id) == (True, "PR-theirs")
        assert others == ([STORED] if companion else [])
        assert store.profile("PR-mine") is None  # the lost attempt left nothing behind
        assert store.redone_groups == int(companion)


@PATHS
def test_events_of_one_person_are_serialised_on_their_profile(
    postgres_dsn: str, pg_url: str, pg_schema: str, companion: bool
) -> None:
    with PostgresStore(pg_url) as store:
        [known] = store.commit(Batch(events=[event("m1", identity=visitor("a", "PR1"))]))
        assert known.profile_id == "PR1"
        # Another process, mid-event for the same person, holds the profile and is
        # starting a session: ours must wait for it and then join that session.
        with uncommitted(
            postgres_dsn, pg_schema,
            "SELECT 1 FROM {s}.profiles WHERE id = 'PR1' FOR NO KEY UPDATE",
            "INSERT INTO {s}.sessions VALUES ('SE-theirs', 'PR1', 100, 100)",
        ):  # fmt: skip
            session = SessionOp(at=110.0, timeout=1800, new_session_id="SE-mine")
            mine = event("m2", identity=visitor("a"), session=session)
            future = store.submit(Batch(events=along(companion, mine)))
            wait_until_blocked(postgres_dsn, pg_schema, unless=future)
        outcome, *_ = future.result(TIMEOUT)
        assert (outcome.profile_id, outcome.session_id) == ("PR1", "SE-theirs")
        assert store.redone_groups == 0  # waited for the lock: nothing to redo


def two_people(store: PostgresStore) -> tuple[Identity, Identity]:
    """PR1, known by anonymous id a1, and PR2 (made later: a larger id), by user id u2."""
    user, anonymous = Identity("user_id", "u2"), Identity("anonymous_id", "a1")
    second = IdentityOp(scope="ws", at=100.0, identities=(user,), new_profile_id="PR2")
    made = store.commit(
        Batch(events=[event("m1", identity=visitor("a1", "PR1")), event("m2", identity=second)])
    )
    assert [o.profile_id for o in made] == ["PR1", "PR2"]
    return user, anonymous


def assert_locked_first_then_waits(
    dsn: str, schema: str, store: PostgresStore, batch: Batch
) -> list[Outcome]:
    """While another transaction holds PR2, ``batch`` must wait for it holding PR1: the
    profiles locked in id order. Locked in the events' order (PR2 first), a writer of
    the opposite order would hold one and wait for the other: a deadlock, found under
    load (each costs a second; five in a row answered 503 with the store healthy)."""
    lock = "SELECT 1 FROM {s}.profiles WHERE id = '%s' FOR NO KEY UPDATE"
    with uncommitted(dsn, schema, lock % "PR2") as other:
        future = store.submit(batch)
        wait_until_blocked(dsn, schema, unless=future)
        assert not future.done()
        with pytest.raises(psycopg.errors.LockNotAvailable):
            other.execute((lock % "PR1").replace("{s}", f'"{schema}"') + " NOWAIT")
    return future.result(TIMEOUT)


def test_an_event_naming_two_people_locks_them_in_one_order_whatever_its_own(
    postgres_dsn: str, pg_url: str, pg_schema: str
) -> None:
    """track(u2, a1): the user id's profile comes first in the event, PR1 first in id
    order. A lone single event goes batch at a time, as a sync WSGI worker's commit."""
    with PostgresStore(pg_url) as store:
        user, anonymous = two_people(store)
        both = IdentityOp(scope="ws", at=101.0, identities=(user, anonymous))
        batch = Batch(events=[event("m3", identity=both)])
        [outcome] = assert_locked_first_then_waits(postgres_dsn, pg_schema, store, batch)
        assert outcome.profile_id == "PR2"  # the user id's profile, as before


def test_a_batch_redone_event_by_event_locks_its_people_in_one_order(
    postgres_dsn: str, pg_url: str, pg_schema: str
) -> None:
    """The events of a batch written batch at a time (after the set-wise path gave up)
    lock their profiles first, in id order, as the set-wise path does."""
    with PostgresStore(pg_url) as store:
        user, anonymous = two_people(store)
        batch = Batch(
            events=[
                event("m3", identity=IdentityOp(scope="ws", at=101.0, identities=(user,))),
                event("m4", identity=IdentityOp(scope="ws", at=101.0, identities=(anonymous,))),
            ]
        )
        with mock.patch.object(store, "_commit_set_wise", return_value=None):
            outcomes = assert_locked_first_then_waits(postgres_dsn, pg_schema, store, batch)
        assert [o.profile_id for o in outcomes] == ["PR2", "PR1"]


def test_a_profile_named_outright_is_locked_in_id_order_with_the_owners(
    postgres_dsn: str, pg_url: str, pg_schema: str
) -> None:
    """track(profile_id=PZ, anonymous x), x being PC's: PC first, as the set-wise path
    and every other writer lock them. Locking the named profile first deadlocked against
    track(profile_id=PC, anonymous y), y being PZ's (a review: 42 in 400 commits)."""
    with PostgresStore(pg_url) as store:
        store.commit(
            Batch(events=[event("m0", identity=visitor("x", "PC")),
                          event("m1", identity=visitor("y", "PZ"))])
        )  # fmt: skip
        op = IdentityOp(
            scope="ws", at=101.0, identities=(Identity("anonymous_id", "x"),), profile_id="PZ"
        )
        lock = "SELECT 1 FROM {s}.profiles WHERE id = '%s' FOR NO KEY UPDATE"
        with uncommitted(postgres_dsn, pg_schema, lock % "PZ") as other:
            future = store.submit(Batch(events=[event("m2", identity=op)]))
            wait_until_blocked(postgres_dsn, pg_schema, unless=future)
            assert not future.done()
            with pytest.raises(psycopg.errors.LockNotAvailable):
                other.execute((lock % "PC").replace("{s}", f'"{pg_schema}"') + " NOWAIT")
        [outcome] = future.result(TIMEOUT)
        assert outcome.profile_id == "PZ"


def test_a_deadlock_while_locking_in_order_is_retried_not_answered_503(pg_url: str) -> None:
    """The batch-at-a-time path's first locks can lose a deadlock too (to a writer that
    locks out of order, as one following merge chains may): retried, as any race."""
    from fp_collect.store.postgres.group import lock_in_order as real

    calls: list[tuple[Any, ...]] = []

    def deadlocked_once(*args: Any) -> None:
        calls.append(args)
        if len(calls) == 1:
            raise psycopg.errors.DeadlockDetected("deadlock detected")
        real(*args)

    with PostgresStore(pg_url) as store:
        batch = Batch(
            events=[event("m1", identity=visitor("a")), event("m2", identity=visitor("b"))]
        )
        with (
            mock.patch.object(store, "_commit_set_wise", return_value=None),
            mock.patch(
                "fp_collect.store.postgres.store.lock_in_order", side_effect=deadlocked_once
            ),
        ):
            outcomes = store.commit(batch, TIMEOUT)
        assert [o.stored for o in outcomes] == [True, True]
        assert len(calls) == 2
        assert sorted(e.message_id for e in store.events()) == ["m1", "m2"]


@PATHS
def test_a_duplicate_committed_meanwhile_is_a_duplicate_and_creates_nothing(
    postgres_dsn: str, pg_url: str, pg_schema: str, companion: bool
) -> None:
    insert_m1 = (
        "INSERT INTO {s}.events (source_id, message_id, type, timestamp, received_at, payload)"
        " VALUES ('src', 'm1', 'track', '', '', '{}')"
    )
    with PostgresStore(pg_url) as store:
        # Checked, found nothing, resolved a profile, then met the other copy on insert.
        with uncommitted(postgres_dsn, pg_schema, insert_m1):
            mine = event("m1", identity=visitor("a", "PR1"))
            with_profile = store.submit(Batch(events=along(companion, mine)))
            wait_until_blocked(postgres_dsn, pg_schema)
        assert with_profile.result(TIMEOUT) == [DUPLICATE, *([STORED] if companion else [])]
        assert store.profile("PR1") is None
        assert store.redone_groups == int(companion)  # the set-wise path met it on insert
        # Checked, found nothing, then waited on the claim the other copy was taking.
        order = Claim("order_id", "o-1", at=1.0)
        with uncommitted(
            postgres_dsn, pg_schema,
            insert_m1.replace("'m1'", "'m2'"),
            "INSERT INTO {s}.claims VALUES ('src', 'order_id', 'o-1', NULL)",
        ):  # fmt: skip
            claimed = store.submit(Batch(events=along(companion, event("m2", claims=(order,)))))
            other = store.submit(Batch(events=[event("m3", claims=(order,))]))
            wait_until_blocked(postgres_dsn, pg_schema)
        assert claimed.result(TIMEOUT)[0] == DUPLICATE
        assert other.result(TIMEOUT) == [Outcome(False, "order_id")]


def test_a_batch_that_always_conflicts_fails_alone_after_a_few_attempts(pg_url: str) -> None:
    with PostgresStore(pg_url) as store:
        store.commit(Batch(events=[event("m1", identity=visitor("a", "PR1"))]))
        # A caller-chosen profile id that is taken: creating it conflicts every time.
        bad = store.submit(Batch(events=[event("m2", identity=visitor("b", "PR1"))]))
        good = store.submit(Batch(events=[event("m3", identity=visitor("c"))]))
        with pytest.raises(StoreUnavailable, match="after 5 attempts") as raised:
            bad.result(TIMEOUT)
        assert isinstance(raised.value.__cause__, psycopg.errors.UniqueViolation)
        assert good.result(TIMEOUT)[0].stored
        assert [row.message_id for row in store.events()] == ["m1", "m3"]


def test_close_drains_then_submit_raises_and_reads_still_work(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    futures = [store.submit(Batch(events=[event(f"m{i}")])) for i in range(50)]
    store.close()
    assert all(future.result(0) == [STORED] for future in futures)
    with pytest.raises(StoreUnavailable, match="closed"):
        store.submit(Batch())
    store.close()
    assert len(list(store.events())) == 50


# -- reading with a cursor ------------------------------------------------------------------


def late_row(table: str, message_id: str) -> str:
    """What another process's writer has done mid-transaction: drawn the next id for a
    row it has not yet committed."""
    if table == "events":
        return (
            "INSERT INTO {s}.events (source_id, message_id, type, timestamp, received_at,"
            f" payload) VALUES ('src', '{message_id}', 'track', 't', 'r', '{{}}')"
        )
    return (
        "INSERT INTO {s}.rejections (source_id, reason, message, received_at, endpoint,"
        f" payload, message_id) VALUES ('src', 'r', 'm', 'r', '/v1/t', '{{}}', '{message_id}')"
    )


def rejection(message_id: str) -> RejectionRecord:
    return RejectionRecord("src", message_id, "m", "r", "/v1/t", "{}", None, message_id)


@pytest.mark.parametrize("table", ["events", "rejections"])
def test_a_cursor_never_passes_a_row_another_process_has_yet_to_commit(
    postgres_dsn: str, pg_url: str, pg_schema: str, table: str
) -> None:
    """Ids are drawn at insert, so a smaller one can commit after a larger one: a reader
    whose cursor moved past it would never see it."""

    def commit(message_id: str) -> None:
        if table == "events":
            assert store.commit(Batch(events=[event(message_id)])) == [STORED]
        else:
            store.commit(Batch(rejections=[rejection(message_id)]))

    def read(cursor: int) -> list[tuple[int, str | None]]:
        rows = store.events if table == "events" else store.rejections
        return [(row.id, row.message_id) for row in rows(Query(after_id=cursor))]

    def read_when(cursor: int, count: int) -> list[tuple[int, str | None]]:
        """read(), once ``count`` rows are there: another session's transaction on the
        shared server may hold committed rows back for a moment."""
        deadline = time.monotonic() + TIMEOUT
        while len(rows := read(cursor)) < count:
            assert time.monotonic() < deadline, f"never {count} rows after {cursor}"
            time.sleep(0.02)
        return rows

    with PostgresStore(pg_url) as store:
        commit("first")
        [(cursor, _)] = read_when(0, 1)
        with uncommitted(postgres_dsn, pg_schema, late_row(table, "late")):
            commit("after")  # a larger id, committed
            assert read(cursor) == []  # not yet: the row before it is still being written
            assert read(0) == [(cursor, "first")]
        # Both now, the late one first (it began first), whatever the ids say.
        [(late, late_id), (after, after_id)] = read_when(cursor, 2)
        assert (late_id, after_id) == ("late", "after") and late < after
        assert read(after) == []
        assert read(late) == [(after, "after")]
        with uncommitted(postgres_dsn, pg_schema, late_row(table, "gone")) as rolled_back:
            commit("later")
            rolled_back.rollback()  # a writer that fails lets the reader through
        assert [message_id for _, message_id in read_when(after, 1)] == ["later"]


def test_a_reader_following_writers_of_several_stores_reads_each_event_once(
    pg_url: str,
) -> None:
    """Three stores (three processes' writers, each on its own connection) commit while a
    reader polls with its cursor, as a consumer of the read API does."""
    stores = [PostgresStore(pg_url) for _ in range(3)]

    def write(n: int) -> None:
        for i in range(150):
            batch = [event(f"s{n}-{i}-{j}") for j in range(4)]
            stores[n].commit(Batch(events=batch), TIMEOUT)

    writers = [threading.Thread(target=write, args=(n,)) for n in range(3)]
    for thread in writers:
        thread.start()
    read: list[str] = []
    cursor = 0

    def follow() -> bool:
        nonlocal cursor
        page = list(stores[0].events(Query(after_id=cursor, limit=50)))
        read.extend(row.message_id for row in page)
        cursor = page[-1].id if page else cursor
        return bool(page)

    try:
        while any(thread.is_alive() for thread in writers):
            follow()
    finally:
        for thread in writers:
            thread.join(TIMEOUT)
        for store in stores[1:]:
            store.close()
    with stores[0]:
        # Everything is committed now; another session's open transaction on the shared
        # server may still hold the newest rows back for a moment, never for good.
        wait_for(lambda: not follow() and len(read) >= 3 * 150 * 4, "every event read")
    assert len(read) == len(set(read)) == 3 * 150 * 4


def test_version_1_is_migrated_and_its_rows_read_first_in_id_order(
    postgres_dsn: str, pg_url: str, pg_schema: str
) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute(f'CREATE SCHEMA "{pg_schema}"')
        for statement in MIGRATIONS[0]:
            conn.execute(statement.replace("{s}", f'"{pg_schema}"'))
        conn.execute(f'INSERT INTO "{pg_schema}".schema_version VALUES (1)')
        for message_id in ("old-1", "old-2"):
            insert = late_row("events", message_id).replace("{s}", f'"{pg_schema}"')
            conn.execute(insert)
    with PostgresStore(pg_url) as store:
        assert store.commit(Batch(events=[event("new"), event("old-1")])) == [STORED, DUPLICATE]
        rows = list(store.events())
        assert [row.message_id for row in rows] == ["old-1", "old-2", "new"]
        assert [row.message_id for row in store.events(Query(after_id=rows[0].id))] == [
            "old-2",
            "new",
        ]
        assert [row.reason for row in store.rejections()] == ["duplicate_message_id"]
    assert scalar(postgres_dsn, f'SELECT version FROM "{pg_schema}".schema_version') == 2


# -- two processes ------------------------------------------------------------------------


def _worker(url: str, worker: int, barrier: Barrier, results: Queue[list[Outcome]]) -> None:
    barrier.wait(TIMEOUT)  # both create the new schema at once
    with PostgresStore(url) as store:
        barrier.wait(TIMEOUT)
        outcomes: list[Outcome] = []
        for n in range(0, 40, 10):
            batch: list[EventRecord] = []
            for i in range(n, n + 10):
                batch += [
                    # The same message (and first visitor) from both processes.
                    event(f"m{i}", identity=visitor(f"shared-{i}", f"PR-w{worker}-s{i}")),
                    # Distinct messages, one order: only the claim can refuse these.
                    event(f"w{worker}-o{i}", claims=(Claim("order_id", f"o{i}", at=1.0),)),
                    # An email opened at 100 (held until 160) and again at 200.
                    event(f"w{worker}-e{i}-a",
                          claims=(Claim("email_open", f"u:e{i}", at=100.0, until=160.0),)),
                    event(f"w{worker}-e{i}-b",
                          claims=(Claim("email_open", f"u:e{i}", at=200.0, until=260.0),)),
                    # Distinct messages of one new visitor, with a session.
                    event(f"w{worker}-v{i}", identity=visitor(f"visitor-{i}", f"PR-w{worker}-{i}"),
                          session=SessionOp(100.0, 1800, new_session_id=f"SE-w{worker}-{i}")),
                ]  # fmt: skip
            outcomes += store.commit(Batch(events=batch), TIMEOUT)
        results.put(outcomes)


def test_two_processes_share_one_schema_exactly(
    postgres_dsn: str, pg_url: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Spawned children unpickle _worker by module name; under --import-mode=importlib
    # that name is not importable unless its root is on sys.path (children inherit it).
    monkeypatch.syspath_prepend(Path(__file__).parents[__name__.count(".")])
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results: Queue[list[Outcome]] = ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(pg_url, n, barrier, results)) for n in range(2)]
    for process in workers:
        process.start()
    outcomes = [results.get(timeout=TIMEOUT) for _ in workers]
    for process in workers:
        process.join(TIMEOUT)
        assert process.exitcode == 0
    # Per kind of event (the batch repeats five kinds), what became of it in both.
    kinds = ["shared", "order", "open-a", "open-b", "visitor"]
    tally = Counter(
        (kinds[n % 5], outcome.stored, outcome.reason)
        for worker in outcomes
        for n, outcome in enumerate(worker)
    )
    assert tally == {
        ("shared", True, None): 40, ("shared", False, "duplicate_message_id"): 40,
        ("order", True, None): 40, ("order", False, "order_id"): 40,
        ("open-a", True, None): 40, ("open-a", False, "email_open"): 40,
        ("open-b", True, None): 40, ("open-b", False, "email_open"): 40,
        ("visitor", True, None): 80,
    }  # fmt: skip
    # Both processes' events of one new visitor landed on one profile and one session.
    first, second = ([o for n, o in enumerate(worker) if n % 5 == 4] for worker in outcomes)
    for mine, theirs in zip(first, second, strict=True):
        assert (mine.profile_id, mine.session_id) == (theirs.profile_id, theirs.session_id)
    # No profile was made for a duplicate or by a lost race: one per visitor.
    profiles = scalar(postgres_dsn, f'SELECT count(*) FROM "{pg_schema}".profiles')
    assert profiles == 80
    with PostgresStore(pg_url) as store:
        stored = Counter(row.message_id for row in store.events())
    assert max(stored.values()) == 1 and len(stored) == 40 + 40 + 80 + 80


# -- outages ------------------------------------------------------------------------------

# Short timeouts through the proxy so outages are noticed quickly; a failure is then due
# within statement_timeout + 1 + connect_timeout = 4 s. BOUND only catches a hang.
OUTAGE_OPTIONS = {"statement_timeout": 1, "connect_timeout": 2}
BOUND = 20.0


@dataclass
class Attempt:
    submitted: float
    finished: float
    ids: list[str]
    result: list[Outcome] | BaseException


@dataclass
class Load:
    """A few threads committing small batches of new events one after another, until
    stopped or after a bounded number each; every attempt is recorded. Odd threads call
    commit() (the WSGI path: written in the calling thread when nobody else is writing),
    even ones submit() to the writer thread (the event loop's path)."""

    store: Store
    threads: int = 3
    per_thread: int = 3000
    attempts: list[Attempt] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _running: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for t in range(self.threads):
            thread = threading.Thread(target=self._send, args=(t,), daemon=True)
            thread.start()
            self._running.append(thread)
        return self

    def _send(self, t: int) -> None:
        for n in range(self.per_thread):
            if self._stop.is_set():
                return
            ids = [f"t{t}-{n}-{j}" for j in range(5)]
            submitted = time.monotonic()
            result: list[Outcome] | BaseException
            try:
                batch = Batch(events=[event(i) for i in ids])
                if t % 2:
                    result = self.store.commit(batch, TIMEOUT)
                else:
                    result = self.store.submit(batch).result(TIMEOUT)
            except (Exception, FutureTimeout) as exc:  # noqa: BLE001 - recorded, then judged
                result = exc
            with self._lock:
                self.attempts.append(Attempt(submitted, time.monotonic(), ids, result))
            if isinstance(result, BaseException):
                time.sleep(0.05)  # a client backing off; the loop stays bounded anyway

    def count(self, ok: bool, submitted_after: float) -> int:
        with self._lock:
            return sum(
                1
                for a in self.attempts
                if a.submitted > submitted_after and isinstance(a.result, list) == ok
            )

    def stop(self) -> list[Attempt]:
        self._stop.set()
        for thread in self._running:
            thread.join(TIMEOUT)
            assert not thread.is_alive()
        return self.attempts


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def stored_ids(dsn: str, schema: str) -> Counter[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f'SELECT message_id FROM "{schema}".events').fetchall()
    return Counter(message_id for (message_id,) in rows)


def proxied(tcp_proxy: Callable[[str, int], Any], postgres_dsn: str) -> Any:
    parts = urlsplit(postgres_dsn)
    return tcp_proxy(parts.hostname or "127.0.0.1", parts.port or 5432)


@pytest.mark.parametrize("outage", ["cut", "stall"])
def test_writes_fail_within_the_bound_during_an_outage_and_resume_after(
    outage: str,
    postgres_dsn: str,
    pg_schema: str,
    tcp_proxy: Callable[[str, int], Any],
) -> None:
    proxy = proxied(tcp_proxy, postgres_dsn)
    url = with_query(proxy.url(postgres_dsn), schema=pg_schema, **OUTAGE_OPTIONS)
    with PostgresStore(url) as store:
        load = Load(store).start()
        try:
            wait_for(lambda: load.count(True, 0) >= 20, "commits before the outage")
            began = time.monotonic()
            getattr(proxy, outage)()
            wait_for(lambda: load.count(False, began) >= 6, "failures during the outage")
            if outage == "cut":
                with pytest.raises(StoreUnavailable):
                    list(store.events())
            ended = time.monotonic()
            proxy.restore()
            wait_for(lambda: load.count(True, ended) >= 20, "commits after the outage")
        finally:
            attempts = load.stop()
        assert len(list(store.events())) >= 40  # reads resume too
    failures = [a for a in attempts if isinstance(a.result, BaseException)]
    assert failures and all(isinstance(a.result, StoreUnavailable) for a in failures)
    assert all(a.finished - a.submitted < BOUND for a in failures)
    # Nothing submitted while the server was away can have been committed.
    assert not any(
        isinstance(a.result, list) for a in attempts if began < a.submitted and a.finished < ended
    )
    stored = stored_ids(postgres_dsn, pg_schema)
    for a in attempts:
        if isinstance(a.result, list):
            assert a.result == [STORED] * 5
            assert all(stored[i] == 1 for i in a.ids)
        else:  # an unknown fate (a lost COMMIT answer), but never half a batch
            assert {stored[i] for i in a.ids} in ({0}, {1})


def test_a_blocking_commit_gives_up_on_a_silent_server_within_its_own_timeout(
    postgres_dsn: str, pg_schema: str, tcp_proxy: Callable[[str, int], Any]
) -> None:
    """commit() writes in its caller's thread (a WSGI request's), which is answered 503
    once its timeout has passed: the store's much longer timeouts (here half a minute to
    answer a statement, as long to connect) must not hold that thread. The watchdog ends
    the silent connection at the caller's deadline, and a new connection is tried only
    for the time left (libpq's shortest connect_timeout is 2 s)."""
    proxy = proxied(tcp_proxy, postgres_dsn)
    slow = {"statement_timeout": 30, "connect_timeout": 30}
    with PostgresStore(with_query(proxy.url(postgres_dsn), schema=pg_schema, **slow)) as store:
        assert store.commit(Batch(events=[event("m1")]), TIMEOUT) == [STORED]
        proxy.stall()
        for attempt in ("on the open connection", "on a new one"):
            began = time.monotonic()
            with pytest.raises(StoreUnavailable):
                store.commit(Batch(events=[event("m2")]), 1.0)
            assert time.monotonic() - began < 10, attempt  # the store's own bound is 30 s
        proxy.restore()
        assert store.commit(Batch(events=[event("m2")]), TIMEOUT) == [STORED]
    assert stored_ids(postgres_dsn, pg_schema) == Counter({"m1": 1, "m2": 1})


def test_a_deadline_moved_earlier_wakes_the_watchdog() -> None:
    """After a pipeline's allowance (a timeout per statement sent) comes one statement's,
    COMMIT's: a silent server must be caught by that shorter deadline, not after the
    watchdog's sleep until the longer one."""
    ours, theirs = socket.socketpair()
    watchdog = Watchdog()
    try:
        with watchdog.watch(cast(Connection, ours), 0.2) as watch:
            watch.extend(statements=1000)  # 200 s
            time.sleep(0.5)  # the watchdog has looked again, and sleeps until then
            watch.extend()
            deadline = time.monotonic() + 10
            while not watch.fired:
                assert time.monotonic() < deadline, "the watchdog slept on"
                time.sleep(0.02)
    finally:
        watchdog.stop()
        ours.close()
        theirs.close()


def test_a_statement_the_caller_stopped_waiting_for_ends_on_the_server_too(
    postgres_dsn: str, pg_schema: str
) -> None:
    """A commit() behind another session's lock is given up at the caller's deadline;
    its INSERT, still waiting on the server, must not go on waiting (and holding a
    server process) for the store's own statement_timeout, here half a minute."""
    url = with_query(postgres_dsn, schema=pg_schema, statement_timeout=30)
    with PostgresStore(url) as store:
        assert store.commit(Batch(events=[event("m1")]), TIMEOUT) == [STORED]
        with uncommitted(postgres_dsn, pg_schema, "LOCK TABLE {s}.events IN EXCLUSIVE MODE"):
            # Cut by the watchdog, or (a millisecond later, if it wins) by the server.
            with pytest.raises(StoreUnavailable, match=r"commit_timeout|statement timeout"):
                store.commit(Batch(events=[event("m2")]), 0.5)
            # Polled for a third of statement_timeout: long enough for a loaded machine,
            # short enough that a statement left to the server's own timeout is caught.
            deadline = time.monotonic() + 10
            while waiting_on_locks(postgres_dsn, pg_schema):
                assert time.monotonic() < deadline, "the INSERT still waits on the server"
                time.sleep(0.05)
        assert store.commit(Batch(events=[event("m2")]), TIMEOUT) == [STORED]


def test_a_connection_opened_too_late_for_its_caller_is_kept_for_the_next_write(
    postgres_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connecting may take all of a commit()'s time (libpq waits at least 2 s): the
    caller is then answered, but the new connection is sound and is kept, not shut
    down by a deadline that has already passed."""
    with PostgresStore(with_query(postgres_dsn, schema=pg_schema)) as store:
        store._drop_connection()  # the next write connects
        configure = store._configure

        def slow_configure(conn: Any) -> None:
            time.sleep(0.6)  # the caller's 0.5 s are over before the session is set up
            configure(conn)

        monkeypatch.setattr(store, "_configure", slow_configure)
        with pytest.raises(StoreUnavailable, match="commit_timeout"):
            store.commit(Batch(events=[event("m1")]), 0.5)
        monkeypatch.undo()
        kept = store._conn
        assert kept is not None and not kept.closed
        assert store.commit(Batch(events=[event("m1")]), TIMEOUT) == [STORED]
        assert store._conn is kept


def test_a_new_connection_going_silent_during_its_setup_is_given_up_soon(
    postgres_dsn: str,
    pg_schema: str,
    tcp_proxy: Callable[[str, int], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Setting a new session up may outlast the caller's deadline (by SETUP_FLOOR, 2 s),
    not the store's statement_timeout (half a minute here)."""
    proxy = proxied(tcp_proxy, postgres_dsn)
    url = with_query(proxy.url(postgres_dsn), schema=pg_schema, statement_timeout=30)
    with PostgresStore(url) as store:
        store._drop_connection()  # the next write connects
        configure = store._configure

        def stalling_configure(conn: Any) -> None:
            proxy.stall()  # connected, then silent
            configure(conn)

        monkeypatch.setattr(store, "_configure", stalling_configure)
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.commit(Batch(events=[event("m1")]), 0.5)
        assert time.monotonic() - began < 10  # the store's own bound is 31 s
        monkeypatch.undo()
        proxy.restore()
        assert store.commit(Batch(events=[event("m1")]), TIMEOUT) == [STORED]


def test_an_idle_connection_found_broken_is_replaced_before_the_write(
    postgres_dsn: str, pg_schema: str
) -> None:
    with PostgresStore(with_query(postgres_dsn, schema=pg_schema)) as store:
        assert store.commit(Batch(events=[event("m1")]), TIMEOUT) == [STORED]
        conn = store._conn
        assert conn is not None
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")  # psycopg now knows it is broken
        assert store.commit(Batch(events=[event("m2")]), TIMEOUT) == [STORED]


# -- HTTP ---------------------------------------------------------------------------------

WRITE_KEY = "wk_pg_outage"


@contextmanager
def run_uvicorn(app: Any) -> Iterator[int]:
    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="on", ws="none", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), "uvicorn to start")
        assert thread.is_alive()
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


def http(port: int, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": "Basic " + b64encode(f"{WRITE_KEY}:".encode()).decode()}
    if body is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", body, headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def track(port: int, message_id: str) -> tuple[int, dict[str, str], bytes]:
    body = f'{{"userId": "u1", "event": "Order Completed", "messageId": "{message_id}"}}'
    return http(port, "/collect/v1/track", body.encode())


def test_http_answers_503_while_the_database_is_cut_and_200_after(
    postgres_dsn: str, pg_schema: str, tcp_proxy: Callable[[str, int], Any]
) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from fp_collect.adapters.asgi import CollectorMiddleware

    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("home")

    proxy = proxied(tcp_proxy, postgres_dsn)
    commit_timeout = 3.0
    collector = Collector(
        sources=[Source(write_key=WRITE_KEY, id="site")],
        storage=with_query(proxy.url(postgres_dsn), schema=pg_schema, **OUTAGE_OPTIONS),
        prefix="/collect",
        commit_timeout=commit_timeout,
    )
    app = Starlette(routes=[Route("/", home)])
    app.add_middleware(CollectorMiddleware, collector=collector)
    with run_uvicorn(app) as port:
        assert track(port, "before")[0] == 200
        proxy.cut()
        began = time.monotonic()
        status, headers, _ = track(port, "during")
        waited = time.monotonic() - began
        assert (status, headers.get("retry-after")) == (503, "5")
        assert waited < commit_timeout + 2  # answered by the timeout at the latest
        assert http(port, "/")[::2] == (200, b"home")  # the host app is unaffected
        proxy.restore()
        assert track(port, "after")[0] == 200
        assert track(port, "after")[0] == 200  # a retry: stored once
    assert stored_ids(postgres_dsn, pg_schema) == Counter({"before": 1, "after": 1})


def test_the_cli_reports_a_cut_mid_read_in_one_line(
    postgres_dsn: str,
    pg_schema: str,
    tcp_proxy: Callable[[str, int], Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The README's promise for the command: a problem is one line on stderr (exit 2),
    even though psycopg's pool logs each broken connection it discards."""
    from fp_collect import cli

    with PostgresStore(with_query(postgres_dsn, schema=pg_schema)) as store:
        store.commit(Batch(events=[event(f"m{i}") for i in range(30)]))
    proxy = proxied(tcp_proxy, postgres_dsn)
    monkeypatch.setattr(cli, "PAGE_SIZE", 10)
    printed = cli._payload_line

    def cut_after_the_first_page(event: Any) -> str:
        if event.message_id == "m9":
            proxy.cut()
        return printed(event)

    monkeypatch.setattr(cli, "_payload_line", cut_after_the_first_page)
    # As in the command's own process: no handler anywhere (pytest installs its own).
    monkeypatch.setattr(logging.root, "handlers", [])
    url = with_query(proxy.url(postgres_dsn), schema=pg_schema, **OUTAGE_OPTIONS)
    status = cli.main(["events", "--storage", url], environ={})
    out, err = capsys.readouterr()
    assert status == 2
    assert len(out.splitlines()) == 10  # the first page, then the cut
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fp-collect events: error: PostgreSQL read failed")


def flask_site(storage: str, commit_timeout: float, **options: Any) -> tuple[Any, Collector]:
    """A Flask site with a home page and the collector under /collect."""
    from flask import Flask

    from fp_collect.adapters.wsgi import init_app

    app = Flask(__name__)
    app.add_url_rule("/", "home", lambda: "home")
    collector = init_app(
        app,
        sources=[Source(write_key=WRITE_KEY, id="site")],
        storage=storage,
        prefix="/collect",
        commit_timeout=commit_timeout,
        **options,
    )
    return app, collector


READ_TOKEN = "a-read-token-of-16-characters"


@pytest.mark.parametrize("outage", ["cut", "stall"])
def test_the_read_api_answers_503_by_its_commit_timeout_while_the_database_is_down(
    postgres_dsn: str, pg_schema: str, tcp_proxy: Callable[[str, int], Any], outage: str
) -> None:
    """A read waits for a pooled connection, and the pool does not tell its waiters that
    connecting fails: without the request's deadline a read waited the pool's whole
    timeout (connect_timeout + statement_timeout + 1: here 33 s) to answer 503."""
    proxy = proxied(tcp_proxy, postgres_dsn)
    commit_timeout = 1.0
    storage = with_query(
        proxy.url(postgres_dsn), schema=pg_schema, statement_timeout=30, connect_timeout=2
    )
    app, collector = flask_site(storage, commit_timeout, read_tokens=(READ_TOKEN,))
    client = app.test_client()
    bearer = {"Authorization": f"Bearer {READ_TOKEN}"}

    def read() -> tuple[int, Any]:
        response = client.get("/collect/events?source_id=site", headers=bearer)
        return response.status_code, response.get_json()

    try:
        assert read() == (200, {"events": [], "next_cursor": None})
        getattr(proxy, outage)()
        for attempt in range(3):  # the pooled connection, then new ones
            began = time.monotonic()
            status, body = read()
            assert (status, body["code"]) == (503, "store_unavailable"), attempt
            assert time.monotonic() - began < commit_timeout + 5, attempt  # not 33 s
        proxy.restore()
        deadline = time.monotonic() + BOUND
        while read()[0] != 200:
            assert time.monotonic() < deadline, "reads did not resume"
            time.sleep(0.2)
    finally:
        collector.close()


def test_a_flask_request_answers_503_by_its_commit_timeout_while_the_database_stalls(
    postgres_dsn: str, pg_schema: str, tcp_proxy: Callable[[str, int], Any]
) -> None:
    """The WSGI path: the request's own thread writes its batch, so only the store can
    end that write in time. With the store's timeouts at half a minute, a stalled server
    must still cost the request no more than its commit_timeout (plus libpq's 2 s to try
    a new connection, once the stalled one is given up)."""
    proxy = proxied(tcp_proxy, postgres_dsn)
    commit_timeout = 1.0
    storage = with_query(
        proxy.url(postgres_dsn), schema=pg_schema, statement_timeout=30, connect_timeout=30
    )
    app, collector = flask_site(storage, commit_timeout)
    client = app.test_client()
    auth = {"Authorization": "Basic " + b64encode(f"{WRITE_KEY}:".encode()).decode()}

    def track(message_id: str) -> tuple[int, str | None]:
        body = {"userId": "u1", "event": "Signed Up", "messageId": message_id}
        response = client.post("/collect/v1/track", json=body, headers=auth)
        return response.status_code, response.headers.get("retry-after")

    try:
        assert track("before") == (200, None)
        proxy.stall()
        for attempt in ("on the stalled connection", "on a new one"):
            began = time.monotonic()
            assert track("during") == (503, "5"), attempt
            assert time.monotonic() - began < commit_timeout + 5, attempt  # not 30 s
        assert client.get("/").data == b"home"  # the host app is unaffected
        proxy.restore()
        assert track("after") == (200, None)
    finally:
        collector.close()
    assert stored_ids(postgres_dsn, pg_schema) == Counter({"before": 1, "after": 1})
