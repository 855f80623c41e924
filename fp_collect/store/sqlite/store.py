"""The SQLite store itself (its design: :mod:`fp_collect.store.sqlite`)."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, suppress
from dataclasses import replace
from typing import Literal
from urllib.parse import quote

import ujson

from fp_collect.errors import ConfigError, StoreUnavailable
from fp_collect.store.base import (
    DUPLICATE,
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
    claim_is_held,
    refused_records,
    restart_after_fork,
    time_left,
)
from fp_collect.store.decide import decide
from fp_collect.store.identity import resolve_event
from fp_collect.store.sqlite.graph import Known, Rows, SQLGraph, prefetch
from fp_collect.store.sqlite.sql import (
    EVENT_COLUMNS,
    INSERT_EVENT,
    INSERT_REJECTION,
    MIGRATIONS,
    REJECTION_COLUMNS,
    SCHEMA,
    SCHEMA_VERSION,
    UPSERT_CLAIM,
    Row,
    event_row,
)

MAX_GROUP = 512


class SQLiteStore(Store):
    """A WAL-mode SQLite file shared by any number of threads and worker processes."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout: float = 5.0,
        create: bool = True,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ConfigError(f"synchronous must be 'FULL' or 'NORMAL', not {synchronous!r}")
        # Absolute: a host app that changes its working directory keeps its store.
        self._path = os.path.abspath(os.fspath(path))
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        if create:
            self._create_schema()
        else:
            self._require_current()
        # The store's file (device, inode): the only one it ever reads or writes. Never
        # held open by a descriptor of ours: closing one would drop every lock SQLite's
        # own connections hold on the file in this process (POSIX locks are per process).
        self._file = _file_identity(self._path)
        # Set for good once the file at the path is another: a file made there later may
        # even get the old one's inode number, once nothing holds the old one open.
        self._lost = False
        self._writes = WriteQueue(f"SQLite store {self._path!r} is closed")
        # The one write connection, used only by whoever holds ``self._writes.writing``:
        # the writer thread, or a caller of commit() writing its own batch.
        self._conn: sqlite3.Connection | None = None
        # A forked child's copy of its parent's write connection, never used (_after_fork).
        self._inherited: sqlite3.Connection | None = None
        self._start_writer()
        restart_after_fork(self)

    def _start_writer(self) -> None:
        self._writer = threading.Thread(target=self._run, name="fp-collect-sqlite", daemon=True)
        self._writer.start()

    def _after_fork(self) -> None:
        """In a forked child (see :func:`restart_after_fork`): a writer of its own, with
        a queue and locks of its own (the parent's may have been held mid-write)."""
        if self._writes.closed:
            return
        # The parent's connection is neither used nor closed here: closing it could
        # checkpoint and remove the -wal the parent is writing. Kept, unused.
        self._inherited, self._conn = self._conn, None
        self._writes = WriteQueue(f"SQLite store {self._path!r} is closed")
        self._start_writer()

    def _connect(self, *, create: bool = False) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves; the module's implicit
        # transactions would start deferred ones, which fail under multi-process contention.
        # ``timeout`` is SQLite's busy timeout: wait for other processes' locks, then fail.
        # check_same_thread=False: the write connection passes between the writer thread
        # and commit()'s callers, never used by two at once (``WriteQueue.writing``).
        # Only the schema's creation may create the file: once the store is open, a file
        # that has gone is an error to report (503), not an empty store to start afresh.
        mode = "rwc" if create else "rw"
        return sqlite3.connect(
            f"file:{quote(self._path)}?mode={mode}",
            uri=True,
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )

    def _write_connection(self) -> sqlite3.Connection:
        """The write connection, opened when there is none, on the store's own file."""
        self._check_file()
        if self._conn is None:
            self._conn = self._connect()
            self._conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        return self._conn

    def _check_file(self) -> None:
        """Refuse (503) to go on once the store's file is no longer at its path.

        SQLite keeps writing into a file removed under an open connection: every event
        answered as stored would be lost with it. Nor may it turn to a file put there
        since: the -wal and -shm files left beside it belong to the old one, and SQLite
        would read the old file's last commits into it. Looked at before each write and
        each read (a stat, about 2 µs); a change is final.
        """
        try:
            at_path = _file_identity(self._path)
        except OSError as exc:  # unavailable for now, not lost
            raise StoreUnavailable(f"cannot look at SQLite file {self._path!r}: {exc}") from exc
        if self._lost or self._file is None or at_path != self._file:
            # (A writer's failed group then drops its connection, as after any failure.)
            self._lost = True
            raise StoreUnavailable(
                f"SQLite file {self._path!r} was removed or replaced while in use; this store"
                " reads and writes only the file it opened: restart the collector (with"
                " the file's -wal and -shm files removed or restored with it)"
            )

    def _require_current(self) -> None:
        """For a reader (``create=False``): the file must exist and hold fp-collect's
        current tables. Looked at read-only: a reader creates, converts and migrates
        nothing (a collector using the file migrates it)."""
        if not os.path.isfile(self._path):
            raise ConfigError(f"no SQLite store at {self._path!r} (nothing was created)")
        # An ordinary connection that only reads, not mode=ro: a read-only one cannot
        # remove the -wal and -shm files it makes beside a WAL-mode file.
        try:
            with closing(self._connect()) as conn:
                found = conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
                ).fetchone()
                version = (
                    found and conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
                )
        except sqlite3.Error as exc:
            raise ConfigError(f"{self._path!r} is not a SQLite store: {exc}") from exc
        if found is None:
            raise ConfigError(f"{self._path!r} holds no fp-collect store (nothing was created)")
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"{self._path!r} has schema version {version}, expected {SCHEMA_VERSION};"
                " nothing was changed (a collector using this file migrates it)"
            )

    def _create_schema(self) -> None:
        _create_private(self._path)
        try:
            with closing(self._connect(create=True)) as conn:
                mode = self._enable_wal(conn)
                if mode != "wal":
                    raise ConfigError(f"SQLite store {self._path!r} needs a file that supports WAL")
                conn.executescript(SCHEMA)
                (version,) = conn.execute("SELECT max(version) FROM schema_version").fetchone()
                while version in MIGRATIONS:
                    conn.executescript(MIGRATIONS[version])
                    # Another process may have migrated between our read and our lock.
                    (version,) = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        except sqlite3.Error as exc:
            if "duplicate column" in str(exc):
                return self._create_schema()  # lost the migration race: it is done now
            raise StoreUnavailable(f"cannot open SQLite store {self._path!r}: {exc}") from exc
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"{self._path!r} has schema version {version}, expected {SCHEMA_VERSION}"
            )

    def _enable_wal(self, conn: sqlite3.Connection) -> str:
        """Switch the file to WAL (a lasting property of the file) and return the mode.

        Changing the journal mode needs the file to itself, and SQLite answers "locked"
        at once rather than waiting on the busy timeout when another process opening
        the same new file got there first; so wait for it here, within that timeout.
        """
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
                if mode == "wal":
                    return "wal"
                (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                return str(mode)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    # -- writing -------------------------------------------------------------------------

    def submit(self, batch: Batch) -> Commit:
        return self._writes.submit(batch)

    def commit(self, batch: Batch, timeout: float | None = None) -> list[Outcome]:
        # Written here when nobody else is writing (see WriteQueue.commit_here); a batch
        # written here waits for other processes' locks up to the busy timeout, or for
        # as long as ``timeout`` leaves if that is shorter (see _begin).
        return self._writes.commit_here(batch, timeout, self._commit_group)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            group, stopping = self._writes.next_group(MAX_GROUP)
            if group:
                with self._writes.writing:
                    self._commit_group(group)
        with self._writes.writing:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _commit_group(self, group: list[Job]) -> None:
        results: list[tuple[Commit, list[Outcome] | BaseException]]
        try:
            conn = self._write_connection()
            self._begin(conn)
            try:
                # Optimistically: the whole group in one transaction without savepoints
                # (two statements per batch, and a batch almost never fails); what its
                # events need to know -- which message ids are stored, which claims are
                # held, who owns their identities -- looked up set-wise; the group's
                # events, claims, new profiles and identities inserted at once at the end.
                graph = SQLGraph(conn, deferred=True)
                known = prefetch(conn, graph, [job.batch for job in group])
                rows = Rows()
                results = [
                    (job.commit, self._apply_fast(conn, graph, known, rows, job.batch))
                    for job in group
                ]
                graph.flush()
                rows.insert(conn)
            except Exception:
                if not conn.in_transaction:
                    raise  # SQLite rolled the transaction back itself (disk full, I/O)
                # Some batch failed: start over, one event at a time and one savepoint per
                # batch, so that it fails alone and the rest of the group still commits.
                conn.execute("ROLLBACK")
                self._begin(conn)
                graph = SQLGraph(conn)
                results = [
                    (job.commit, self._apply_in_savepoint(conn, graph, job.batch)) for job in group
                ]
            conn.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - any failure here must reach every caller
            if self._conn is not None:
                self._conn.close()  # rolls back; the next group reconnects from scratch
                self._conn = None
            for job in group:
                job.commit.set_exception(_unavailable(f"SQLite commit failed: {exc}", exc))
            return
        for commit, result in results:
            commit.settle(result)

    def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE: take the write lock, waiting for other processes' up to the
        busy timeout -- or, writing for a caller of commit(), for the time it has left
        if that is shorter. (This is the wait for other writers: once it holds the write
        lock, a WAL-mode writer waits for no one, readers included.)"""
        left = time_left()
        if left is None or left >= self._busy_timeout:
            conn.execute("BEGIN IMMEDIATE")
            return
        conn.execute(f"PRAGMA busy_timeout = {max(0, int(left * 1000))}")
        try:
            conn.execute("BEGIN IMMEDIATE")
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")

    def _apply_in_savepoint(
        self, conn: sqlite3.Connection, graph: SQLGraph, batch: Batch
    ) -> list[Outcome] | BaseException:
        conn.execute("SAVEPOINT batch")
        try:
            outcomes = self._apply(conn, graph, batch)
        except Exception as exc:  # reported on this batch's commit only
            if not conn.in_transaction:
                # Some errors (disk full, I/O) make SQLite roll back the whole
                # transaction: the other batches are gone too, so fail the group.
                raise
            conn.execute("ROLLBACK TO batch")
            conn.execute("RELEASE batch")
            graph.forget()  # it may remember rows that were just rolled back
            return _unavailable(f"batch not stored: {exc}", exc)
        conn.execute("RELEASE batch")
        return outcomes

    def _apply_fast(
        self,
        conn: sqlite3.Connection,
        graph: SQLGraph,
        known: Known,
        rows: Rows,
        batch: Batch,
    ) -> list[Outcome]:
        """:meth:`_apply` for a batch whose message ids, claims and identities
        :func:`prefetch` looked up: no query per event to find duplicates or held
        claims; the rows to insert are added to ``rows``, written once for the group.

        The same decisions as :meth:`_apply_event`, in the same order, from ``known``,
        which gains each message id and claim written here.
        """
        outcomes = []
        for event in batch.events:
            outcome = decide(event, known.stored, known.claims, graph)
            if outcome.stored:
                rows.events.append(event_row(event, outcome.profile_id, outcome.session_id))
                rows.claims += [(event.source_id, c.kind, c.key, c.until) for c in event.claims]
            outcomes.append(outcome)
        self._record_refused(conn, batch, outcomes)
        return outcomes

    def _apply(self, conn: sqlite3.Connection, graph: SQLGraph, batch: Batch) -> list[Outcome]:
        """Write ``batch`` one event at a time, every check a query of its own."""
        outcomes = [self._apply_event(conn, graph, event) for event in batch.events]
        self._record_refused(conn, batch, outcomes)
        return outcomes

    def _record_refused(
        self, conn: sqlite3.Connection, batch: Batch, outcomes: list[Outcome]
    ) -> None:
        """Record the batch's rejections and every event the store refused."""
        refused = refused_records(batch, outcomes)
        rows = [
            (r.source_id, r.reason, r.message, r.received_at, r.endpoint, r.payload, r.index,
             r.message_id)
            for r in (*refused, *batch.rejections)
        ]  # fmt: skip
        if rows:
            conn.executemany(INSERT_REJECTION, rows)

    def _apply_event(
        self, conn: sqlite3.Connection, graph: SQLGraph, event: EventRecord
    ) -> Outcome:
        blocked_by: str | None = None
        for claim in event.claims:
            row = conn.execute(
                "SELECT until FROM claims WHERE source_id = ? AND kind = ? AND key = ?",
                (event.source_id, claim.kind, claim.key),
            ).fetchone()
            if row is not None and claim_is_held(row[0], claim.at):
                blocked_by = claim.kind
                break
        if blocked_by is not None or event.identity is not None:
            # A duplicate is reported as such even when its claim is also held; and it
            # must be known before identity resolution writes profiles for it.
            duplicate = conn.execute(
                "SELECT 1 FROM events WHERE source_id = ? AND message_id = ?",
                (event.source_id, event.message_id),
            ).fetchone()
            if duplicate:
                return DUPLICATE
            if blocked_by is not None:
                return Outcome(False, blocked_by)
        outcome = resolve_event(graph, event)
        if not outcome.stored:
            return outcome
        row = event_row(event, outcome.profile_id, outcome.session_id)
        if not conn.execute(INSERT_EVENT, row).rowcount:
            return DUPLICATE
        if event.claims:
            conn.executemany(
                UPSERT_CLAIM, [(event.source_id, c.kind, c.key, c.until) for c in event.claims]
            )
        return outcome

    # -- reading -------------------------------------------------------------------------

    def events(self, query: Query = Query()) -> Iterator[StoredEvent]:
        rows = self._select("events", EVENT_COLUMNS, "type", query)
        return (_stored_event(row) for row in rows)

    def rejections(self, query: Query = Query()) -> Iterator[StoredRejection]:
        rows = self._select("rejections", REJECTION_COLUMNS, "reason", query)
        return (StoredRejection(*row) for row in rows)

    def profile(self, profile_id: str) -> StoredProfile | None:
        self._check_file()
        try:
            with closing(self._connect()) as conn:
                graph = SQLGraph(conn)
                canonical = graph.canonical(profile_id)
                if canonical is None:
                    return None
                scope, created_at, traits = conn.execute(
                    "SELECT scope, created_at, traits FROM profiles WHERE id = ?", (canonical,)
                ).fetchone()
                identities = conn.execute(
                    "SELECT kind, value FROM identities WHERE profile_id = ? AND scope = ?"
                    " ORDER BY kind, value",
                    (canonical, scope),
                ).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite read failed: {exc}") from exc
        return StoredProfile(
            canonical, scope, created_at, ujson.loads(traits),
            tuple(Identity(kind, value) for kind, value in identities),
        )  # fmt: skip

    def _select(self, table: str, columns: str, type_column: str, query: Query) -> list[Row]:
        if query.limit is not None and query.limit < 0:
            raise ValueError(f"limit must be None or >= 0, not {query.limit}")
        where = ["id > ?"]
        params: list[object] = [query.after_id]
        family_at = 0  # where the profile filter's parameter sits, if any
        if query.source_id is not None:
            where.append("source_id = ?")
            params.append(query.source_id)
        if query.type is not None:
            where.append(f"{type_column} = ?")
            params.append(query.type)
        if query.since is not None:
            where.append("received_at >= ?")
            params.append(query.since)
        if query.until is not None:
            where.append("received_at < ?")
            params.append(query.until)
        if table == "events" and query.name is not None:
            where.append("name = ?")
            params.append(query.name)
        if table == "events" and query.profile_id is not None:
            # The survivor and every profile merged into it, transitively.
            where.append(
                "profile_id IN (WITH RECURSIVE family(id) AS (SELECT ? UNION"
                " SELECT p.id FROM profiles p JOIN family f ON p.merged_into = f.id)"
                " SELECT id FROM family)"
            )
            family_at = len(params)
            params.append(query.profile_id)
        if table == "events" and query.flagged:
            where.append("warnings IS NOT NULL")
        sql = f"SELECT {columns} FROM {table} WHERE {' AND '.join(where)} ORDER BY id"
        if query.limit is not None:
            sql += " LIMIT ?"
            params.append(query.limit)
        # A fresh connection per read keeps readers off the writer's connection and
        # leaves nothing open to leak; WAL lets it read while the writer commits.
        self._check_file()
        try:
            with closing(self._connect()) as conn:
                if family_at:
                    # Name the family by its survivor, whichever member's id was given.
                    params[family_at] = SQLGraph(conn).canonical(str(params[family_at]))
                return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite read failed: {exc}") from exc

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Commit everything already submitted, stop the writer and close the file."""
        self._writes.close()
        if threading.current_thread() is not self._writer:
            self._writer.join()


def _create_private(path: str) -> None:
    """Create the file at ``path``, readable and writable by its owner only, unless there
    is one: it will hold personal data (email addresses, IP addresses, traits). SQLite
    gives the -wal and -shm files it makes beside it the same permissions."""
    # OSError: there is one already; or SQLite will say why it cannot make one.
    with suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _file_identity(path: str) -> tuple[int, int] | None:
    """The (device, inode) of the file at ``path``, None if there is none (any other
    error, say of a network filesystem, is raised: it proves nothing)."""
    try:
        found = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return found.st_dev, found.st_ino


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
