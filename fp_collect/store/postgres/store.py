"""The PostgreSQL store itself: the writer thread's group commits and the reads."""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import replace
from typing import Any, TypeVar

import psycopg
import ujson
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool

from fp_collect.errors import ConfigError, StoreUnavailable
from fp_collect.store.base import (
    DUPLICATE,
    STORED,
    Batch,
    Commit,
    EventRecord,
    Identity,
    Job,
    Outcome,
    Query,
    Store,
    StoredEvent,
    StoredProfile,
    StoredRejection,
    WriteQueue,
    logger,
    refused_records,
    restart_after_fork,
    time_left,
)
from fp_collect.store.identity import resolve_event
from fp_collect.store.postgres.graph import PGGraph
from fp_collect.store.postgres.group import (
    GroupRaced,
    Link,
    event_row,
    lock_in_order,
    write_group,
)
from fp_collect.store.postgres.options import parse_url
from fp_collect.store.postgres.sql import (
    EVENT_COLUMNS,
    MIGRATIONS,
    RACES,
    REJECTION_COLUMNS,
    SCHEMA_VERSION,
    STATEMENTS,
    Connection,
    Cursor,
    Row,
    Run,
    qualified,
    quote,
)
from fp_collect.store.postgres.text import ADAPTERS
from fp_collect.store.postgres.watchdog import Watch, Watchdog

# Beyond the server's statement timeout, how long a silent connection is given.
STALL_GRACE = 1.0
# The least time a new connection's session setup is given, whatever a caller has left.
SETUP_FLOOR = 2.0
# A group is one transaction: enough batches to share a commit, few enough events that
# the first request in it is not kept waiting behind thousands of round trips.
MAX_GROUP = 256
MAX_GROUP_ROWS = 2000
# Attempts for a batch that keeps losing races (unique violations, deadlocks).
MAX_ATTEMPTS = 5
# Rows per query when reading back; each page is one bounded statement.
READ_PAGE = 2000

_T = TypeVar("_T")
_Done = tuple[Commit, "list[Outcome] | BaseException"]


class _Race(Exception):
    """A batch lost a race with another transaction; it was rolled back, redo it."""


class _Unreachable(StoreUnavailable):
    """No answer from the server: no connection, or one that went silent."""


class _OutOfTime(StoreUnavailable):
    """The caller of commit() had no time left to begin a transaction: its batch fails,
    and the connection, never used for it, is kept."""


class PostgresStore(Store):
    """A PostgreSQL schema shared by any number of threads, processes and machines.

    :param url: ``postgresql://`` or ``postgres://`` URL; see the module documentation
        for the options it may carry (``schema``, ``pool_size``, ``statement_timeout``,
        ``connect_timeout``).
    :param create: create (or migrate) the schema when it is missing or older. False
        for a reader that must not change the database: a schema without fp-collect's
        tables (a typo in ``schema=``, say) is then a :class:`ConfigError`.
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.options = options = parse_url(url)
        self._sql = {name: qualified(text, options.schema) for name, text in STATEMENTS.items()}
        self._stall_timeout = options.statement_timeout + STALL_GRACE
        self._connect_kwargs: dict[str, Any] = dict(options.defaults)
        self._watchdog = Watchdog()
        # Set once the schema is known to be current; until then (the server was away at
        # start-up) the first connection that reads or writes makes sure of it.
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        conn: Connection | None = None
        try:
            conn = self._connect()
            try:
                self._ensure_schema(conn, create)
            except BaseException:
                conn.close()
                raise
            self._schema_ready = True
        except StoreUnavailable as exc:
            if not create or _misconfigured(exc):  # nothing that waiting would mend
                self._watchdog.stop()
                raise
            # The host app must start (and keep serving) while its database is away:
            # collection answers 503 until the server is back, then carries on.
            logger.warning(
                "fp-collect: PostgreSQL is unavailable at start-up (%s); events are"
                " answered 503 until it is back",
                exc,
            )
            conn = None
        except BaseException:
            self._watchdog.stop()
            raise
        # Used only by whoever holds self._writes.writing: the writer thread, or a caller
        # of commit() writing its own batch (psycopg connections may change threads).
        self._conn: Connection | None = conn
        self._pool = self._make_pool()
        self._writes = WriteQueue(f"PostgreSQL store {options.schema!r} is closed")
        # Groups the set-wise path gave up on (a race with another writer, a bad batch)
        # and that were redone batch at a time: a figure for monitoring, and for tests.
        self.redone_groups = 0
        # A forked child's copies of its parent's connection, pool and watchdog (_after_fork).
        self._inherited: object = None
        self._start_writer()
        restart_after_fork(self)

    def _make_pool(self) -> ConnectionPool[Connection]:
        options = self.options
        return ConnectionPool(
            options.conninfo,
            kwargs={"autocommit": True, "context": ADAPTERS, **self._connect_kwargs},
            # Reads are occasional: open connections on demand, keep none idle for long.
            min_size=0,
            max_size=options.pool_size,
            configure=self._configure,
            check=self._check,
            name=f"fp-collect-{options.schema}",
            timeout=options.connect_timeout + self._stall_timeout,
            # Give up background reconnection quickly: the next read tries afresh, so
            # reads resume as soon as the server does instead of after a long backoff.
            reconnect_timeout=float(options.connect_timeout),
            max_idle=60.0,
            num_workers=1,
            open=True,
        )

    def _start_writer(self) -> None:
        self._writer = threading.Thread(target=self._run, name="fp-collect-postgres", daemon=True)
        self._writer.start()

    def _after_fork(self) -> None:
        """In a forked child (see :func:`restart_after_fork`): connections, a pool, a
        watchdog, a queue and a writer of its own. The parent's connections share their
        sockets with it: kept here, unused (the parent's pool and watchdog threads are
        not in the child anyway)."""
        if self._writes.closed:
            return
        self._inherited = (self._conn, self._pool, self._watchdog)
        self._conn = None
        self._schema_lock = threading.Lock()
        self._watchdog = Watchdog()
        self._pool = self._make_pool()
        self._writes = WriteQueue(f"PostgreSQL store {self.options.schema!r} is closed")
        self._start_writer()

    # -- connections ---------------------------------------------------------------------

    def _connect(self) -> Connection:
        kwargs = self._connect_kwargs
        left = time_left()  # writing for a caller of commit(): its time bounds the attempt
        if left is not None and left < self.options.connect_timeout:
            if left <= 0:
                raise StoreUnavailable(
                    "cannot connect to PostgreSQL: the request's commit_timeout has passed"
                )
            # libpq's connect_timeout is in whole seconds, and at least 2.
            kwargs = {**kwargs, "connect_timeout": max(2, math.ceil(left))}
        try:
            conn: Connection = psycopg.Connection.connect(
                self.options.conninfo, autocommit=True, context=ADAPTERS, **kwargs
            )
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            self._configure(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, psycopg.Error):
                raise StoreUnavailable(f"cannot set up a PostgreSQL session: {exc}") from exc
            raise
        return conn

    def _configure(self, conn: Connection) -> None:
        statement = str(int(self.options.statement_timeout * 1000))
        # The server waits on an idle transaction as long as we wait on the server: if
        # this process (or its network) stops mid-transaction, the session is ended and
        # its locks are freed for everyone else.
        idle = str(int(self._stall_timeout * 1000))
        # A connection that took all of a caller's time to open is still good for the next
        # write (_begin then says the caller is late): setting it up may take SETUP_FLOOR
        # past the caller's deadline, as connecting may take libpq's 2 s.
        with self._watchdog.watch(conn, self._stall_timeout, floor=SETUP_FLOOR):
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false),"
                " set_config('idle_in_transaction_session_timeout', %s, false)",
                (statement, idle),
            )

    def _check(self, conn: Connection) -> None:
        """The pool's check on checkout: a dead (or silent) connection is replaced."""
        with self._watchdog.watch(conn, self._stall_timeout):
            conn.execute("")

    def _ready(self, conn: Connection) -> None:
        """Make sure of the schema on ``conn``, if the server was away at start-up."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if not self._schema_ready:
                try:
                    self._ensure_schema(conn, create=True)
                except ConfigError as exc:  # found late: no caller to raise it to
                    raise StoreUnavailable(str(exc)) from exc
                self._schema_ready = True

    def _ensure_schema(self, conn: Connection, create: bool) -> None:
        schema = self.options.schema
        version = self._schema_version(conn)
        if version < SCHEMA_VERSION and not create:
            found = f"version {version} of its tables" if version else "no fp-collect tables"
            raise ConfigError(
                f"PostgreSQL schema {schema!r} holds {found}; nothing was changed"
                " (a collector using this URL creates or migrates it)"
            )
        if version < SCHEMA_VERSION:
            # Two processes opening a new database at once: the second waits here for
            # the first's transaction and then finds the schema current.
            key = int.from_bytes(
                hashlib.blake2b(f"fp-collect:{schema}".encode(), digest_size=8).digest(),
                "big",
                signed=True,
            )
            try:
                with self._watchdog.watch(conn, self._stall_timeout) as watch:
                    cur = conn.cursor()

                    def run(sql: str, params: Sequence[object] = ()) -> Cursor:
                        watch.extend()
                        return cur.execute(qualified(sql, schema), params)

                    with conn.transaction():
                        run("SELECT pg_advisory_xact_lock(%s)", (key,))
                        version = self._schema_version(conn)
                        exists = run("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
                        if exists.fetchone() is None:
                            # Looked up first: CREATE SCHEMA IF NOT EXISTS needs the
                            # right to create even when the schema is there.
                            run(f"CREATE SCHEMA IF NOT EXISTS {quote(schema)}")
                        for step in MIGRATIONS[version:SCHEMA_VERSION]:
                            for statement in step:
                                run(statement)
                        if version < SCHEMA_VERSION:
                            run("DELETE FROM {s}.schema_version")
                            run("INSERT INTO {s}.schema_version VALUES (%s)", (SCHEMA_VERSION,))
                            version = SCHEMA_VERSION
                        watch.extend()  # for the COMMIT
            except psycopg.OperationalError as exc:
                raise StoreUnavailable(f"cannot set up schema {schema!r}: {exc}") from exc
            except psycopg.Error as exc:
                raise ConfigError(f"cannot set up schema {schema!r}: {exc}") from exc
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"PostgreSQL schema {schema!r} has version {version}, expected {SCHEMA_VERSION}"
            )

    def _schema_version(self, conn: Connection) -> int:
        table = qualified("{s}.schema_version", self.options.schema)
        try:
            with self._watchdog.watch(conn, self._stall_timeout):
                # pg_class read as a table, with this statement's snapshot: to_regclass()
                # would look through the transaction's catalog cache, which does not see a
                # table that another session created while we waited for the lock.
                row = conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c"
                    " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = %s AND c.relname = 'schema_version')",
                    (self.options.schema,),
                ).fetchone()
                if not (row and row[0]):
                    return 0
                row = conn.execute(f"SELECT max(version) FROM {table}").fetchone()
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"cannot open PostgreSQL store: {exc}") from exc
        except psycopg.Error as exc:
            raise ConfigError(f"cannot read the PostgreSQL schema version: {exc}") from exc
        return int(row[0]) if row and row[0] is not None else 0

    # -- writing -------------------------------------------------------------------------

    def submit(self, batch: Batch) -> Commit:
        return self._writes.submit(batch)

    def commit(self, batch: Batch, timeout: float | None = None) -> list[Outcome]:
        # Written here when nobody else is writing (see WriteQueue.commit_here); a batch
        # written here is bounded by the statement and connect timeouts, and by the
        # time ``timeout`` leaves it when that is shorter (the watchdog, _connect).
        return self._writes.commit_here(batch, timeout, self._commit_group)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            group, stopping = self._writes.next_group(MAX_GROUP, MAX_GROUP_ROWS)
            with self._writes.writing:
                unreachable = self._commit_group(group) if group else None
            if unreachable is not None and not stopping:
                stopping = self._fail_queued(unreachable)
        with self._writes.writing:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _fail_queued(self, cause: _Unreachable) -> bool:
        """The server could not be reached: fail everything already waiting now, rather
        than making each group wait for its own connection attempt. True at the stop."""
        queued, stopping = self._writes.take_all()
        for job in queued:
            job.commit.set_exception(_unavailable(str(cause), cause))
        return stopping

    def _commit_group(self, group: list[Job]) -> _Unreachable | None:
        """Commit ``group``; the error when the server could not be reached at all.

        Set-wise (group.py), in a few round trips for the whole group, unless it holds
        a single event: batch at a time, that takes fewer statements (each costs the
        client more CPU than the server's work on it). If the set-wise path fails for
        any reason short of losing the connection, it is rolled back and the group is
        redone batch at a time, where a bad batch fails alone and a batch that lost a
        race is retried (counted in :attr:`redone_groups`).
        """
        jobs = group
        if sum(len(job.batch.events) for job in jobs) > 1:
            try:
                done = self._commit_set_wise(jobs)
            except Exception as exc:  # noqa: BLE001 - any failure here must reach every caller
                return self._fail_group(jobs, exc)
            if done is not None:
                for commit, result in done:
                    commit.settle(result)
                return None
            self.redone_groups += 1
        races = 0
        while jobs:
            try:
                done, jobs, lost = self._commit_some(jobs)
            except Exception as exc:  # noqa: BLE001 - any failure here must reach every caller
                return self._fail_group(jobs, exc)
            for commit, result in done:
                commit.settle(result)
            if jobs:
                # jobs[0] lost a race; it is retried alone at the head of a new
                # transaction, after the batches before it were committed.
                races = races + 1 if not done else 1
                if races >= MAX_ATTEMPTS:
                    message = f"batch not stored after {races} attempts: {lost}"
                    jobs[0].commit.set_exception(_unavailable(message, lost))
                    jobs, races = jobs[1:], 0
        return None

    def _fail_group(self, jobs: list[Job], exc: Exception) -> _Unreachable | None:
        """The transaction is lost (rolled back by the server with the session): every
        batch of it fails, and the next group starts on a new connection -- unless the
        caller's time ran out before any transaction began."""
        if not isinstance(exc, _OutOfTime):
            self._drop_connection()
        unreachable = exc if isinstance(exc, _Unreachable) else None
        message = str(exc) if unreachable else f"PostgreSQL commit failed: {exc}"
        for job in jobs:
            job.commit.set_exception(_unavailable(message, exc))
        return unreachable

    def _commit_set_wise(self, jobs: list[Job]) -> list[_Done] | None:
        """Write and commit ``jobs`` together in one transaction (see group.py); None
        when that failed and was rolled back, to be redone batch at a time."""
        conn = self._begin()
        with self._watchdog.watch(conn, self._stall_timeout) as watch:
            link = Link(conn, watch)
            try:
                results = write_group(link, self._sql, [job.batch for job in jobs])
                link.run("COMMIT")
            except Exception as exc:
                if watch.fired:
                    raise _Unreachable(watch.silence()) from exc
                if conn.broken or conn.info.transaction_status not in (
                    TransactionStatus.INTRANS,
                    TransactionStatus.INERROR,
                ):
                    raise
                try:
                    link.run("ROLLBACK")
                except Exception as rollback_error:
                    # Our own statement_timeout ended a statement at the caller's deadline,
                    # and the watchdog then ended the ROLLBACK: the connection is gone.
                    if watch.fired:
                        raise _Unreachable(watch.silence()) from rollback_error
                    raise
                if not isinstance(exc, (GroupRaced, *RACES)):
                    logger.debug("group redone batch at a time after: %r", exc)
                return None
        return [(job.commit, result) for job, result in zip(jobs, results, strict=True)]

    def _commit_some(self, jobs: list[Job]) -> tuple[list[_Done], list[Job], BaseException]:
        """Apply jobs in one transaction until one loses a race; commit those before it.
        Returns their results, the jobs left (the loser first) and why it lost."""
        conn = self._begin()
        done: list[_Done] = []
        left: list[Job] = []
        lost: BaseException = _Race()
        with self._watchdog.watch(conn, self._stall_timeout) as watch:
            cur = conn.cursor()

            def run(sql: str, params: Sequence[object] = ()) -> Cursor:
                watch.extend()
                return cur.execute(sql, params)

            try:
                if sum(len(job.batch.events) for job in jobs) > 1:
                    # Events lock their rows one by one: in the order of their keys, as
                    # the set-wise path does, not crosswise with other writers.
                    try:
                        lock_in_order(Link(conn, watch), self._sql, [job.batch for job in jobs])
                    except RACES as race:  # a deadlock all the same: retried, as below
                        run("ROLLBACK", ())
                        return done, jobs, race
                apply = self._apply_alone if len(jobs) == 1 else self._apply_in_savepoint
                for n, job in enumerate(jobs):
                    try:
                        done.append((job.commit, apply(conn, run, job.batch)))
                    except _Race as race:
                        left, lost = jobs[n:], race.__cause__ or race
                        break
                if conn.info.transaction_status != TransactionStatus.IDLE:
                    run("COMMIT", ())  # (a lone batch that failed has rolled back already)
            except Exception as exc:
                if watch.fired:
                    raise _Unreachable(watch.silence()) from exc
                raise
        return done, left, lost

    def _begin(self) -> Connection:
        """The writer's connection with a transaction open, reconnecting as needed.

        A connection that died while idle (a server restart, a cut network) is only
        found out by using it; BEGIN is then retried once on a fresh one, which is safe
        because nothing was sent before it.
        """
        retry = self._conn is not None
        while True:
            if self._conn is None:
                try:
                    self._conn = self._connect()
                    self._ready(self._conn)
                except StoreUnavailable as exc:
                    self._drop_connection()
                    raise _Unreachable(str(exc)) from exc.__cause__
            watch: Watch | None = None
            try:
                begin = self._begin_statement()
                with self._watchdog.watch(self._conn, self._stall_timeout) as watch:
                    self._conn.execute(begin)
                return self._conn
            except psycopg.Error as exc:
                self._drop_connection()
                if watch is not None and watch.cut_short:  # no time left for another try
                    raise _Unreachable(watch.silence()) from exc
                if not retry:
                    raise _Unreachable(f"PostgreSQL is unavailable: {exc}") from exc
                retry = False

    def _begin_statement(self) -> str:
        """BEGIN; for a caller of commit() with less time left than the server's
        statement_timeout, with that time as the transaction's statement_timeout too: a
        statement the watchdog stops waiting for (behind a lock, say) then ends on the
        server soon after, rather than running on with nobody left to answer."""
        left = time_left()
        if left is None or left >= self.options.statement_timeout:
            return "BEGIN"
        if left <= 0:
            raise _OutOfTime("the request's commit_timeout passed before its transaction began")
        return f"BEGIN; SET LOCAL statement_timeout = {max(1, int(left * 1000))}"

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with suppress(Exception):
                self._conn.close()  # a transaction left open is rolled back by the server
            self._conn = None

    def _apply_in_savepoint(
        self, conn: Connection, run: Run, batch: Batch
    ) -> list[Outcome] | BaseException:
        run("SAVEPOINT batch", ())
        try:
            outcomes = self._apply(run, batch)
        except Exception as exc:  # noqa: BLE001 - reported on this batch's commit, or re-raised
            return self._undo_batch(
                conn, run, exc, ("ROLLBACK TO SAVEPOINT batch", "RELEASE SAVEPOINT batch")
            )
        run("RELEASE SAVEPOINT batch", ())
        return outcomes

    def _apply_alone(
        self, conn: Connection, run: Run, batch: Batch
    ) -> list[Outcome] | BaseException:
        """:meth:`_apply_in_savepoint` for a group of one batch: the transaction is the
        batch's own, so a failure rolls all of it back and no SAVEPOINT is needed. Two
        round trips fewer per commit; every commit of a sync WSGI worker is such a group."""
        try:
            return self._apply(run, batch)
        except Exception as exc:  # noqa: BLE001 - reported on this batch's commit, or re-raised
            return self._undo_batch(conn, run, exc, ("ROLLBACK",))

    def _undo_batch(
        self, conn: Connection, run: Run, exc: Exception, undo: tuple[str, ...]
    ) -> BaseException:
        """Undo a batch that failed, whose error is then reported on its commit only.
        Raises :class:`_Race` when it lost a race (to be redone), and ``exc`` when the
        connection is gone, and the other batches with it."""
        if conn.broken or conn.info.transaction_status not in (
            TransactionStatus.INTRANS,
            TransactionStatus.INERROR,
        ):
            raise exc
        for statement in undo:
            run(statement, ())
        if isinstance(exc, _Race):
            raise exc
        if isinstance(exc, RACES):
            raise _Race() from exc
        return _unavailable(f"batch not stored: {exc}", exc)

    def _apply(self, run: Run, batch: Batch) -> list[Outcome]:
        outcomes = [self._apply_event(run, event) for event in batch.events]
        refused = refused_records(batch, outcomes)
        for r in (*refused, *batch.rejections):
            run(
                self._sql["insert_rejection"],
                (r.source_id, r.reason, r.message, r.received_at, r.endpoint, r.payload, r.index,
                 r.message_id),
            )  # fmt: skip
        return outcomes

    def _apply_event(self, run: Run, event: EventRecord) -> Outcome:
        sql = self._sql
        if not event.claims and event.identity is None:
            # No side effects: the unique index alone decides, in one statement.
            row = run(sql["insert_event"], event_row(event, None, None)).fetchone()
            return STORED if row is not None else DUPLICATE
        # A duplicate takes no claim and touches no profile, so find it first.
        if self._is_stored(run, event):
            return DUPLICATE
        # Claims are taken before the profile is resolved; when the event is refused
        # after taking some, a savepoint gives them back (only needed in those cases).
        claims = list({(c.kind, c.key): c for c in event.claims}.values())
        undo = len(claims) > 1 or bool(
            claims and event.identity is not None and not event.identity.create
        )
        if undo:
            run("SAVEPOINT event", ())
        for claim in claims:
            taken = run(
                sql["take_claim"],
                (event.source_id, claim.kind, claim.key, claim.until, claim.at),
            ).fetchone()
            if taken is None:
                self._undo(run, undo)
                # Held by a transaction that committed while we waited: if it stored
                # this very message, the event is a duplicate, as it is everywhere.
                return DUPLICATE if self._is_stored(run, event) else Outcome(False, claim.kind)
        outcome = resolve_event(PGGraph(run, sql, lock=True), event)
        if not outcome.stored:
            self._undo(run, undo)
            return outcome
        row = event_row(event, outcome.profile_id, outcome.session_id)
        inserted = run(sql["insert_event"], row)
        if inserted.fetchone() is None:
            # Another transaction stored this message after our check: undo everything
            # this batch did and redo it, when the check will see that copy.
            raise _Race(f"message {event.message_id!r} was stored meanwhile")
        if undo:
            run("RELEASE SAVEPOINT event", ())
        return outcome

    def _is_stored(self, run: Run, event: EventRecord) -> bool:
        found = run(self._sql["is_stored"], (event.source_id, event.message_id)).fetchone()
        return found is not None

    @staticmethod
    def _undo(run: Run, undo: bool) -> None:
        if undo:
            run("ROLLBACK TO SAVEPOINT event", ())
            run("RELEASE SAVEPOINT event", ())

    # -- reading -------------------------------------------------------------------------

    def events(self, query: Query = Query()) -> Iterator[StoredEvent]:
        rows = self._select("events", EVENT_COLUMNS, "type", query)
        return (_stored_event(row) for row in rows)

    def rejections(self, query: Query = Query()) -> Iterator[StoredRejection]:
        rows = self._select("rejections", REJECTION_COLUMNS, "reason", query)
        return (StoredRejection(*row) for row in rows)

    def profile(self, profile_id: str) -> StoredProfile | None:
        def read(conn: Connection, run: Run) -> StoredProfile | None:
            with conn.transaction():  # one consistent view of a profile being merged
                canonical = PGGraph(run, self._sql, lock=False).canonical(profile_id)
                if canonical is None:
                    return None
                row = run(self._sql["profile"], (canonical,)).fetchone()
                assert row is not None
                scope, created_at, traits = row
                identities = run(self._sql["identities"], (canonical, scope)).fetchall()
            return StoredProfile(
                canonical, scope, created_at, ujson.loads(traits),
                tuple(Identity(kind, value) for kind, value in identities),
            )  # fmt: skip

        return self._read(read)

    def _select(self, table: str, columns: str, type_column: str, query: Query) -> Iterator[Row]:
        if query.limit is not None and query.limit < 0:
            raise ValueError(f"limit must be None or >= 0, not {query.limit}")
        # A reader's cursor is the id of the last row it read. Ids are drawn when a row
        # is inserted, so across processes a smaller id can still be uncommitted when a
        # larger one is read; a cursor past it would skip it. Rows are therefore read in
        # (xact_id, id) order, and only those whose transaction is older than every
        # transaction still running (the statement's snapshot xmin): any row committed
        # later sorts after everything returned now. The cursor's own row gives its place
        # in that order (an id that is no row: the nearest row below it).
        where = [
            f"(xact_id, id) > (COALESCE((SELECT c.xact_id FROM {{s}}.{table} c WHERE c.id <= %s"
            " ORDER BY c.id DESC LIMIT 1), '0'), %s)",
            "xact_id < pg_snapshot_xmin(pg_current_snapshot())",
        ]
        params: list[object] = []
        for column, value in (
            ("source_id", query.source_id),
            (type_column, query.type),
            ("name", query.name if table == "events" else None),
        ):
            if value is not None:
                where.append(f"{column} = %s")
                params.append(value)
        if table == "events" and query.profile_id is not None:
            # The survivor (whichever member's id was given) and every profile merged
            # into it, transitively.
            survivor = self.profile(query.profile_id)
            if survivor is None:
                return iter(())
            where.append(
                'profile_id IN (WITH RECURSIVE family(id) AS (SELECT %s::text COLLATE "C" UNION'
                " SELECT p.id FROM {s}.profiles p JOIN family f ON p.merged_into = f.id)"
                " SELECT id FROM family)"
            )
            params.append(survivor.id)
        if query.since is not None:
            where.append("received_at >= %s")
            params.append(query.since)
        if query.until is not None:
            where.append("received_at < %s")
            params.append(query.until)
        if table == "events" and query.flagged:
            where.append("warnings IS NOT NULL")
        sql = qualified(
            f"SELECT {columns} FROM {{s}}.{table} WHERE {' AND '.join(where)}"
            " ORDER BY xact_id, id LIMIT %s",
            self.options.schema,
        )

        def page(after_id: int, size: int) -> list[Row]:
            return self._read(
                lambda conn, run: run(sql, (after_id, after_id, *params, size)).fetchall()
            )

        # Pages of bounded size, each its own short statement, so a large read never
        # runs into the statement timeout; the first is read now so that an unavailable
        # store is reported by this call, as by the other backends.
        size = READ_PAGE if query.limit is None else min(READ_PAGE, query.limit)
        first = page(query.after_id, size) if size else []

        def pages() -> Iterator[Row]:
            rows, remaining = first, query.limit
            while rows:
                yield from rows
                if remaining is not None:
                    remaining -= len(rows)
                if len(rows) < size or remaining == 0:
                    return
                rows = page(rows[-1][0], size if remaining is None else min(size, remaining))

        return pages()

    def _read(self, read: Callable[[Connection, Run], _T]) -> _T:
        try:
            with (
                self._read_connection() as conn,
                self._watchdog.watch(conn, self._stall_timeout) as watch,
            ):
                cur = conn.cursor()

                def run(sql: str, params: Sequence[object] = ()) -> Cursor:
                    watch.extend()
                    return cur.execute(sql, params)

                return read(conn, run)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"PostgreSQL read failed: {exc}") from exc

    @contextmanager
    def _read_connection(self) -> Iterator[Connection]:
        if not self._pool.closed:
            with self._pool.connection(timeout=self._pool_wait()) as conn:
                self._ready(conn)
                yield conn
            return
        # After close, what is stored stays readable (as with every backend), on a
        # connection of its own.
        conn = self._connect()
        try:
            self._ready(conn)
            yield conn
        finally:
            conn.close()

    def _pool_wait(self) -> float:
        """How long a read waits for a pooled connection: the pool's timeout, or what the
        request it serves has left (the pool does not tell waiters that connecting fails:
        in an outage they would wait the whole timeout)."""
        left = time_left()
        if left is None:
            return float(self._pool.timeout)
        if left <= 0:
            raise StoreUnavailable("PostgreSQL read not begun: the request's commit_timeout passed")
        return min(float(self._pool.timeout), left)

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Commit everything already submitted, stop the writer, close every connection."""
        if not self._writes.close():
            return  # closed already
        if threading.current_thread() is not self._writer:
            self._writer.join()
        self._pool.close()
        self._watchdog.stop()


# What libpq says when the server answered, and will answer again, that this URL is
# wrong: its role, password, database or rights (FATAL at start-up, not one of the
# transient states below), or an option libpq itself refuses.
_TRANSIENT_FATAL = ("starting up", "shutting down", "recovery", "too many", "connection slots")
_BAD_OPTION = ("invalid connection option", "invalid sslmode", "invalid integer value")


def _misconfigured(exc: StoreUnavailable) -> bool:
    """Whether a failure to connect at start-up is the URL's fault, not an outage."""
    text = str(exc.__cause__ or exc)
    if "FATAL:" in text:
        return not any(state in text for state in _TRANSIENT_FATAL)
    return any(option in text for option in _BAD_OPTION)


def _stored_event(row: Row) -> StoredEvent:
    *columns, warnings = row
    event = StoredEvent(*columns)
    return replace(event, warnings=tuple(ujson.loads(warnings))) if warnings else event


def _unavailable(message: str, cause: BaseException) -> StoreUnavailable:
    # One instance per commit: a shared exception would have its traceback rewritten by
    # every thread that raises it.
    error = StoreUnavailable(message)
    error.__cause__ = cause
    return error
