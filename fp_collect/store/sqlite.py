"""``sqlite:///path.db``: the embedded default store, for one machine and many processes.

Design:

* **WAL.** Readers never block the writer and the writer never blocks readers, so read
  queries use their own short-lived connections and never wait behind commits.
* **One writer thread per store.** ``submit`` only enqueues; a single daemon thread owns
  the write connection. Each time it wakes it drains everything queued (up to
  ``MAX_GROUP`` batches) and commits it all in one transaction: one fsync serves many
  concurrent requests (group commit).
* **BEGIN IMMEDIATE.** The write lock is taken up front, so worker *processes* sharing the
  file queue up on ``busy_timeout`` instead of failing half-way with SQLITE_BUSY, and every
  check-then-write below is atomic across processes. The UNIQUE constraint on
  ``(source_id, message_id)`` still has the last word on dedup.
* **Set-wise, optimistic groups.** Within its transaction (no other process can write
  meanwhile) the writer looks up at once which of the group's message ids are stored and
  who owns the identities its events name, then inserts the group's events, claims, new
  profiles and new identities with one ``executemany`` each, with no savepoint per batch.
  If any batch fails, the group is rolled back and redone one event at a time with one
  SAVEPOINT per batch: a batch that fails rolls back alone and fails only its own commit;
  the rest of the group still commits.
* **A blocking caller writes itself when nobody else is.** :meth:`SQLiteStore.commit`
  (what a WSGI request thread calls) writes its batch in its own thread when the write
  lock is free, sparing the hand-over to the writer thread and back: a lone caller
  (Flask under a sync worker) never waits on another thread. When a write is under way
  its batch goes to the writer thread like ``submit``'s, to share the next group's
  transaction (gthread workers). One write connection, used by one lock holder at a time.
  Such a caller waits for other processes' write lock no longer than its timeout leaves.
* **Durable before success.** A batch's :class:`Commit` is settled only after COMMIT
  returns. If the group cannot commit, every batch in it fails with
  :class:`StoreUnavailable`; the writer drops its connection, opens a fresh one for the
  next group and keeps serving.

``synchronous="FULL"`` (the default) makes a commit survive power loss. ``"NORMAL"`` is
faster but may lose the last commits on power loss (never on a process crash).

After :meth:`SQLiteStore.close`, ``submit`` raises :class:`StoreUnavailable` (not
RuntimeError) so requests racing a graceful shutdown are answered 503, not 500.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import quote

import ujson

from fp_collect.decoding import dumps
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

SCHEMA_VERSION = 4
MAX_GROUP = 512

_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version (version)
    SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM schema_version);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    source_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    type TEXT NOT NULL,
    name TEXT,
    user_id TEXT,
    anonymous_id TEXT,
    timestamp TEXT NOT NULL,
    received_at TEXT NOT NULL,
    payload TEXT NOT NULL,
    UNIQUE (source_id, message_id)
);
CREATE INDEX IF NOT EXISTS events_source ON events (source_id, id);
CREATE INDEX IF NOT EXISTS events_received ON events (received_at);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY,
    source_id TEXT,
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    received_at TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    payload TEXT NOT NULL,
    idx INTEGER,
    message_id TEXT
);
CREATE INDEX IF NOT EXISTS rejections_source ON rejections (source_id, id);
CREATE INDEX IF NOT EXISTS rejections_received ON rejections (received_at);
CREATE TABLE IF NOT EXISTS claims (
    source_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    until REAL,
    PRIMARY KEY (source_id, kind, key)
);
COMMIT;
"""

# Version 2: profiles, their identities and sessions; events remember both.
_MIGRATE_TO_2 = """
BEGIN IMMEDIATE;
ALTER TABLE events ADD COLUMN profile_id TEXT;
ALTER TABLE events ADD COLUMN session_id TEXT;
CREATE INDEX IF NOT EXISTS events_profile ON events (profile_id, id);
CREATE TABLE IF NOT EXISTS profiles (
    id TEXT PRIMARY KEY,
    scope TEXT NOT NULL,
    created_at REAL NOT NULL,
    traits TEXT NOT NULL,
    merged_into TEXT
);
CREATE TABLE IF NOT EXISTS identities (
    scope TEXT NOT NULL,
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    PRIMARY KEY (scope, kind, value)
);
CREATE INDEX IF NOT EXISTS identities_profile ON identities (profile_id);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    profile_id TEXT NOT NULL,
    started_at REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_profile ON sessions (profile_id, last_seen);
UPDATE schema_version SET version = 2;
COMMIT;
"""

# Version 3: warnings an event was stored with (a JSON array), NULL when none.
_MIGRATE_TO_3 = """
BEGIN IMMEDIATE;
ALTER TABLE events ADD COLUMN warnings TEXT;
CREATE INDEX IF NOT EXISTS events_flagged ON events (source_id, id) WHERE warnings IS NOT NULL;
UPDATE schema_version SET version = 3;
COMMIT;
"""
# Version 4: find the profiles merged into one (reading a profile's events follows merges).
_MIGRATE_TO_4 = """
BEGIN IMMEDIATE;
CREATE INDEX IF NOT EXISTS profiles_merged ON profiles (merged_into) WHERE merged_into IS NOT NULL;
UPDATE schema_version SET version = 4;
COMMIT;
"""
_MIGRATIONS = {1: _MIGRATE_TO_2, 2: _MIGRATE_TO_3, 3: _MIGRATE_TO_4}

_EVENT_COLUMNS = (
    "id, source_id, message_id, type, name, user_id, anonymous_id, timestamp, received_at,"
    " payload, profile_id, session_id, warnings"
)
_REJECTION_COLUMNS = (
    "id, source_id, reason, message, received_at, endpoint, payload, idx, message_id"
)
_INSERT_EVENT = (
    "INSERT INTO events (source_id, message_id, type, name, user_id, anonymous_id, timestamp,"
    " received_at, payload, profile_id, session_id, warnings)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (source_id, message_id) DO NOTHING"
)
_UPSERT_CLAIM = "INSERT OR REPLACE INTO claims (source_id, kind, key, until) VALUES (?, ?, ?, ?)"
_INSERT_PROFILE = "INSERT INTO profiles (id, scope, created_at, traits) VALUES (?, ?, ?, '{}')"
_INSERT_IDENTITY = "INSERT INTO identities (scope, kind, value, profile_id) VALUES (?, ?, ?, ?)"
_INSERT_REJECTION = (
    "INSERT INTO rejections (source_id, reason, message, received_at, endpoint, payload, idx,"
    " message_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)

_Row = tuple[Any, ...]


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
        try:
            with closing(self._connect(create=True)) as conn:
                mode = self._enable_wal(conn)
                if mode != "wal":
                    raise ConfigError(f"SQLite store {self._path!r} needs a file that supports WAL")
                conn.executescript(_SCHEMA)
                (version,) = conn.execute("SELECT max(version) FROM schema_version").fetchone()
                while version in _MIGRATIONS:
                    conn.executescript(_MIGRATIONS[version])
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
                graph = _SQLGraph(conn, deferred=True)
                known = _prefetch(conn, graph, [job.batch for job in group])
                rows = _Rows()
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
                graph = _SQLGraph(conn)
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
        self, conn: sqlite3.Connection, graph: _SQLGraph, batch: Batch
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
        graph: _SQLGraph,
        known: _Known,
        rows: _Rows,
        batch: Batch,
    ) -> list[Outcome]:
        """:meth:`_apply` for a batch whose message ids, claims and identities
        :func:`_prefetch` looked up: no query per event to find duplicates or held
        claims; the rows to insert are added to ``rows``, written once for the group.

        The same decisions as :meth:`_apply_event`, in the same order, from ``known``,
        which gains each message id and claim written here.
        """
        outcomes = []
        for event in batch.events:
            outcome = decide(event, known.stored, known.claims, graph)
            if outcome.stored:
                rows.events.append(_event_row(event, outcome.profile_id, outcome.session_id))
                rows.claims += [(event.source_id, c.kind, c.key, c.until) for c in event.claims]
            outcomes.append(outcome)
        self._record_refused(conn, batch, outcomes)
        return outcomes

    def _apply(self, conn: sqlite3.Connection, graph: _SQLGraph, batch: Batch) -> list[Outcome]:
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
            conn.executemany(_INSERT_REJECTION, rows)

    def _apply_event(
        self, conn: sqlite3.Connection, graph: _SQLGraph, event: EventRecord
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
        row = _event_row(event, outcome.profile_id, outcome.session_id)
        if not conn.execute(_INSERT_EVENT, row).rowcount:
            return DUPLICATE
        if event.claims:
            conn.executemany(
                _UPSERT_CLAIM, [(event.source_id, c.kind, c.key, c.until) for c in event.claims]
            )
        return outcome

    # -- reading -------------------------------------------------------------------------

    def events(self, query: Query = Query()) -> Iterator[StoredEvent]:
        rows = self._select("events", _EVENT_COLUMNS, "type", query)
        return (_stored_event(row) for row in rows)

    def rejections(self, query: Query = Query()) -> Iterator[StoredRejection]:
        rows = self._select("rejections", _REJECTION_COLUMNS, "reason", query)
        return (StoredRejection(*row) for row in rows)

    def profile(self, profile_id: str) -> StoredProfile | None:
        self._check_file()
        try:
            with closing(self._connect()) as conn:
                graph = _SQLGraph(conn)
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

    def _select(self, table: str, columns: str, type_column: str, query: Query) -> list[_Row]:
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
                    params[family_at] = _SQLGraph(conn).canonical(str(params[family_at]))
                return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite read failed: {exc}") from exc

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Commit everything already submitted, stop the writer and close the file."""
        self._writes.close()
        if threading.current_thread() is not self._writer:
            self._writer.join()


def _file_identity(path: str) -> tuple[int, int] | None:
    """The (device, inode) of the file at ``path``, None if there is none (any other
    error, say of a network filesystem, is raised: it proves nothing)."""
    try:
        found = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return found.st_dev, found.st_ino


def _event_row(event: EventRecord, profile_id: str | None, session_id: str | None) -> _Row:
    """The values of :data:`_INSERT_EVENT` for ``event``."""
    return (
        event.source_id,
        event.message_id,
        event.type,
        event.name,
        event.user_id,
        event.anonymous_id,
        event.timestamp,
        event.received_at,
        event.payload,
        profile_id,
        session_id,
        dumps(list(event.warnings)) if event.warnings else None,
    )


# The lengths an "IN (...)" list is padded to (by repeating its last value): each length
# is a distinct statement, and a few of them stay in the connection's statement cache
# where one per group size would push out every other statement. The largest is far
# below SQLite's limit on parameters (32,766 since 3.32).
_IN_SIZES = (1, 4, 16, 64, 256)


def _chunks(values: set[str]) -> Iterator[list[str]]:
    ordered = sorted(values)  # neighbours in the index: fewer pages visited
    largest = _IN_SIZES[-1]
    for start in range(0, len(ordered), largest):
        chunk = ordered[start : start + largest]
        size = next(size for size in _IN_SIZES if size >= len(chunk))
        yield chunk + [chunk[-1]] * (size - len(chunk))


def _marks(values: list[str]) -> str:
    return ", ".join("?" * len(values))


@dataclass(slots=True)
class _Known:
    """What :func:`_prefetch` found for a group, kept current while it is written:
    the (source, message id) already stored, and the ``until`` of every claim already
    held among the (source, kind, key) its events make (absent: not held)."""

    stored: set[tuple[str, str]] = field(default_factory=set)
    claims: dict[tuple[str, str, str], float | None] = field(default_factory=dict)


@dataclass(slots=True)
class _Rows:
    """A group's events and claims, inserted with one statement each (after every batch
    of the group was decided: nothing decided later depends on these rows, only on
    :class:`_Known`)."""

    events: list[_Row] = field(default_factory=list)
    claims: list[_Row] = field(default_factory=list)

    def insert(self, conn: sqlite3.Connection) -> None:
        if self.events:
            inserted = conn.executemany(_INSERT_EVENT, self.events).rowcount
            if inserted != len(self.events):  # never, while we hold the write lock
                raise RuntimeError(f"{len(self.events) - inserted} events were stored meanwhile")
        if self.claims:
            conn.executemany(_UPSERT_CLAIM, self.claims)


def _prefetch(conn: sqlite3.Connection, graph: _SQLGraph, batches: list[Batch]) -> _Known:
    """Look up, a few hundred at a time, what a group's events will ask one by one:
    which (source, message id) are already stored and which of their claims are held
    -- returned --, and who owns each identity they name -- remembered by ``graph``.
    Inside the write transaction, so the answers hold until it ends."""
    message_ids: dict[str, set[str]] = {}
    claims: dict[tuple[str, str], set[str]] = {}
    identities: dict[tuple[str, str], set[str]] = {}
    for batch in batches:
        for event in batch.events:
            message_ids.setdefault(event.source_id, set()).add(event.message_id)
            for claim in event.claims:
                claims.setdefault((event.source_id, claim.kind), set()).add(claim.key)
            op = event.identity
            if op is not None:
                for identity in (*op.identities, *op.lookups):
                    identities.setdefault((op.scope, identity.kind), set()).add(identity.value)
    known = _Known()
    for source_id, ids in message_ids.items():
        for chunk in _chunks(ids):
            rows = conn.execute(
                "SELECT message_id FROM events WHERE source_id = ?"
                f" AND message_id IN ({_marks(chunk)})",
                (source_id, *chunk),
            )
            known.stored.update((source_id, message_id) for (message_id,) in rows)
    for (source_id, kind), keys in claims.items():
        for chunk in _chunks(keys):
            rows = conn.execute(
                "SELECT key, until FROM claims WHERE source_id = ? AND kind = ?"
                f" AND key IN ({_marks(chunk)})",
                (source_id, kind, *chunk),
            )
            known.claims.update(((source_id, kind, key), until) for key, until in rows)
    for (scope, kind), values in identities.items():
        for chunk in _chunks(values):
            graph.learn_owners(scope, kind, chunk)
    graph.learn_profiles()
    return known


def _stored_event(row: _Row) -> StoredEvent:
    *columns, warnings = row
    event = StoredEvent(*columns)
    return replace(event, warnings=tuple(ujson.loads(warnings))) if warnings else event


def _unavailable(message: str, cause: BaseException) -> StoreUnavailable:
    # One instance per commit: a shared exception would have its traceback rewritten by
    # every thread that raises it.
    error = StoreUnavailable(message)
    error.__cause__ = cause
    return error


class _SQLGraph:
    """The identity primitives over one connection, inside one transaction.

    Within a write transaction (BEGIN IMMEDIATE) no other connection can change the
    file, so who owns an identity and where a profile was merged can be remembered until
    the transaction ends: identity resolution asks for each owner twice, and a visitor's
    events often come in the same group. Our own writes keep the memo current;
    :meth:`forget` after a rollback to a savepoint. A read-only graph (``profile``) uses
    a fresh instance per read.

    ``deferred``: new profiles and identities -- a row each per new visitor, the most
    common write after the event itself -- are kept and inserted with one statement
    apiece by :meth:`flush`, which runs before any other statement of the graph (so
    every query sees them) and must be called before the transaction commits. Only
    for a transaction without savepoints: a rollback to one would not undo them.
    """

    def __init__(self, conn: sqlite3.Connection, *, deferred: bool = False) -> None:
        self.conn = conn
        self._owners: dict[tuple[str, str, str], str | None] = {}
        self._canonical: dict[str, str | None] = {}
        self._deferred = deferred
        self._new_profiles: list[_Row] = []
        self._new_identities: list[_Row] = []

    def flush(self) -> None:
        """Insert the profiles and identities kept back (``deferred``)."""
        if self._new_profiles:
            self.conn.executemany(_INSERT_PROFILE, self._new_profiles)
            self._new_profiles.clear()
        if self._new_identities:
            self.conn.executemany(_INSERT_IDENTITY, self._new_identities)
            self._new_identities.clear()

    def _execute(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        self.flush()
        return self.conn.execute(sql, params)

    def forget(self) -> None:
        self._owners.clear()
        self._canonical.clear()

    def learn_owners(self, scope: str, kind: str, values: list[str]) -> None:
        """Look up the owners of many identities of one kind at once."""
        found = dict(
            self._execute(
                "SELECT value, profile_id FROM identities WHERE scope = ? AND kind = ?"
                f" AND value IN ({_marks(values)})",
                (scope, kind, *values),
            ).fetchall()
        )
        for value in values:
            self._owners[(scope, kind, value)] = found.get(value)

    def learn_profiles(self) -> None:
        """Look up at once which of the known owners were never merged away."""
        unknown = {p for p in self._owners.values() if p is not None} - set(self._canonical)
        for chunk in _chunks(unknown):
            rows = self._execute(
                f"SELECT id FROM profiles WHERE id IN ({_marks(chunk)}) AND merged_into IS NULL",
                chunk,
            )
            self._canonical.update((profile_id, profile_id) for (profile_id,) in rows)

    def _one(self, sql: str, params: tuple[object, ...]) -> Any:
        row = self._execute(sql, params).fetchone()
        return None if row is None else row[0]

    def owner(self, scope: str, identity: Identity) -> str | None:
        key = (scope, identity.kind, identity.value)
        if key in self._owners:
            return self._owners[key]
        owner: str | None = self._one(
            "SELECT profile_id FROM identities WHERE scope = ? AND kind = ? AND value = ?", key
        )
        self._owners[key] = owner
        return owner

    def canonical(self, profile_id: str) -> str | None:
        if profile_id not in self._canonical:
            self._canonical[profile_id] = self._follow_merges(profile_id)
        return self._canonical[profile_id]

    def _follow_merges(self, profile_id: str) -> str | None:
        current: str | None = profile_id
        while current is not None:
            row = self._execute(
                "SELECT merged_into FROM profiles WHERE id = ?", (current,)
            ).fetchone()
            if row is None:
                return None
            if row[0] is None:
                return current
            current = row[0]
        return None

    def created_at(self, profile_id: str) -> float:
        created: float = self._one("SELECT created_at FROM profiles WHERE id = ?", (profile_id,))
        return created

    def scope_of(self, profile_id: str) -> str:
        scope: str = self._one("SELECT scope FROM profiles WHERE id = ?", (profile_id,))
        return scope

    def create_profile(self, profile_id: str, scope: str, at: float) -> None:
        row = (profile_id, scope, at)
        if self._deferred:
            self._new_profiles.append(row)
        else:
            self._execute(_INSERT_PROFILE, row)
        self._canonical[profile_id] = profile_id

    def attach(self, scope: str, identity: Identity, profile_id: str) -> None:
        key = (scope, identity.kind, identity.value)
        if self._deferred:
            self._new_identities.append((*key, profile_id))
        else:
            self._execute(_INSERT_IDENTITY, (*key, profile_id))
        self._owners[key] = profile_id

    def merge(self, survivor: str, merged: str) -> None:
        self._execute(
            "UPDATE identities SET profile_id = ? WHERE profile_id = ?", (survivor, merged)
        )
        self._execute("UPDATE sessions SET profile_id = ? WHERE profile_id = ?", (survivor, merged))
        gone = ujson.loads(self._one("SELECT traits FROM profiles WHERE id = ?", (merged,)))
        kept = ujson.loads(self._one("SELECT traits FROM profiles WHERE id = ?", (survivor,)))
        self._write_traits(survivor, {**gone, **kept})
        self._execute("UPDATE profiles SET merged_into = ? WHERE id = ?", (survivor, merged))
        # As the UPDATEs above did: the merged profile's identities now name the survivor,
        # and whatever led to the merged profile now leads on to the survivor.
        for key, owner in self._owners.items():
            if owner == merged:
                self._owners[key] = survivor
        self._canonical.clear()

    def update_traits(self, profile_id: str, traits: dict[str, object]) -> None:
        current = ujson.loads(self._one("SELECT traits FROM profiles WHERE id = ?", (profile_id,)))
        self._write_traits(profile_id, {**current, **traits})

    def _write_traits(self, profile_id: str, traits: dict[str, object]) -> None:
        self._execute("UPDATE profiles SET traits = ? WHERE id = ?", (dumps(traits), profile_id))

    def latest_session(self, profile_id: str) -> tuple[str, float] | None:
        row = self._execute(
            "SELECT id, last_seen FROM sessions WHERE profile_id = ?"
            " ORDER BY last_seen DESC, id DESC LIMIT 1",
            (profile_id,),
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def session_owner(self, session_id: str) -> str | None:
        owner: str | None = self._one("SELECT profile_id FROM sessions WHERE id = ?", (session_id,))
        return owner

    def start_session(self, session_id: str, profile_id: str, at: float) -> None:
        self._execute(
            "INSERT INTO sessions (id, profile_id, started_at, last_seen) VALUES (?, ?, ?, ?)",
            (session_id, profile_id, at, at),
        )

    def touch_session(self, session_id: str, at: float) -> None:
        self._execute(
            "UPDATE sessions SET last_seen = max(last_seen, ?) WHERE id = ?", (at, session_id)
        )
