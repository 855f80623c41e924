"""``postgresql://...``: the shared store for many app instances on many machines.

::

    from fp_collect.store import open_store

    store = open_store("postgresql://collector@db.internal/site?schema=fp_collect&pool_size=4")

URL options, read and removed here; every other part of the URL goes to psycopg
(libpq) unchanged, so ``sslmode=``, ``options=``, several hosts, ``PG*`` environment
variables and service files all work:

``schema`` (default ``fp_collect``)
    The PostgreSQL schema that holds every table; created when missing. Not ``public``
    by default because the collector is mounted inside an app that usually shares the
    database, and names like ``events`` or ``profiles`` are likely to be the app's own.
``pool_size`` (default 4)
    The most pooled connections used for reads; the writer holds one more.
``statement_timeout`` (seconds, default 5)
    The server cancels a statement (lock waits included) that runs longer. The client
    gives the server one more second to answer any statement; a connection that stays
    silent longer (a stalled network, a hung server) is shut down and replaced, so a
    commit never hangs.
``connect_timeout`` (seconds, libpq's own; default 5 when neither the URL nor
``PGCONNECT_TIMEOUT`` sets it, as psycopg would otherwise wait 130 s)
    How long opening a connection may take.

So when PostgreSQL becomes unreachable a submitted batch fails with
:class:`StoreUnavailable` within about ``statement_timeout + 1 + connect_timeout``
seconds, and writes resume by themselves once it answers again.

Design:

* **Tables.** ``events``, ``rejections``, ``claims``, ``profiles``, ``identities``,
  ``sessions`` and ``schema_version``, with the meaning of the SQLite store's (schema 3
  there). Text that is compared or ordered uses the ``"C"`` collation, so results do
  not depend on the database's locale and match SQLite's byte order.
* **Schema creation and migration** run in one transaction under a transaction-level
  advisory lock keyed on the schema name: two processes opening a new database at once
  queue up, and the second finds the work done. DDL is transactional in PostgreSQL, so
  a migration is all or nothing. A database already at the current version is opened
  without the lock and without DDL (a role without CREATE rights can then use it).
* **One writer thread, group commit.** ``submit`` only enqueues; the writer drains the
  queue and commits many batches in one transaction, each inside its own SAVEPOINT, so
  a bad batch fails alone. Commits are settled only after COMMIT returns. A blocking
  :meth:`PostgresStore.commit` (a WSGI request thread) writes its batch in its own thread
  when nobody else is writing, and otherwise joins the writer thread's next group.
* **Exact across processes and machines** (everything below happens in the writing
  transaction, at READ COMMITTED):

  - *dedup*: the unique index on ``(source_id, message_id)`` decides. An event with no
    claims and no identity is one ``INSERT ... ON CONFLICT DO NOTHING``. An event with
    side effects checks for a stored copy first; if a concurrent transaction commits the
    same id after that check, our insert finds the conflict (after waiting for it), and
    the batch is rolled back to its savepoint and redone, when the check sees the copy.
  - *claims*: ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` the held claim has expired
    takes a claim in one statement; PostgreSQL makes a concurrent taker wait for our
    commit and then re-evaluates against it, so exactly one wins a held key.
  - *identity*: :func:`~fp_collect.store.identity.resolve_profile` runs over
    :class:`_PGGraph`. Resolving a profile locks its row (``FOR NO KEY UPDATE``), which
    serialises all events, merges and sessions of one person; two first events of a new
    visitor both try to insert the identity and the unique key makes the second fail
    after the first commits, so its batch is redone and finds the first's profile. Lost
    races (unique violations, deadlocks) are retried a few times in a fresh transaction
    after committing the batches before them, so no lock of ours is held while waiting.

* **Outages.** A broken writer connection fails its group with :class:`StoreUnavailable`,
  is discarded, and the next group reconnects. Reads use a psycopg_pool pool whose
  connections are checked on checkout; a dead one is replaced.
* **NUL.** PostgreSQL text cannot hold U+0000, which JSON allows in any string
  (``"\\u0000"``). Every text value is escaped on its way in and unescaped on its way
  out (U+0000 as U+FFFF ``0``, U+FFFF as U+FFFF U+FFFF), so every string round-trips
  exactly; tools reading the tables directly see the escaped form.

**Reading in order.** Ids are drawn when a row is inserted, so across processes an id
can commit after a larger one. Each event and rejection therefore keeps the id of the
transaction that wrote it (``xact_id``), rows are read in ``(xact_id, id)`` order (id
order within one process), and a row is read only once every transaction that began
before its own has ended. A reader following its cursor (the last id it read) thus sees
every row exactly once; a long transaction elsewhere on the server delays new rows
(never loses them) until it ends. Needs PostgreSQL 13 or newer (``xid8``).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import unquote

import psycopg
import ujson
from psycopg import errors as pg_errors
from psycopg.abc import Buffer
from psycopg.adapt import AdaptersMap
from psycopg.conninfo import conninfo_to_dict, timeout_from_conninfo
from psycopg.pq import TransactionStatus
from psycopg.types.string import StrDumperUnknown, TextLoader
from psycopg_pool import ConnectionPool

from fp_collect.decoding import dumps
from fp_collect.errors import ConfigError, StoreUnavailable
from fp_collect.store.base import (
    DUPLICATE,
    STORED,
    UNKNOWN_USER,
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
    refused_records,
)
from fp_collect.store.identity import resolve_profile, resolve_session

SCHEMA_VERSION = 2
DEFAULT_SCHEMA = "fp_collect"
DEFAULT_POOL_SIZE = 4
DEFAULT_CONNECT_TIMEOUT = 5
DEFAULT_STATEMENT_TIMEOUT = 5.0
# Beyond the server's statement timeout, how long a silent connection is given.
STALL_GRACE = 1.0
# A group is one transaction: enough batches to share a commit, few enough events that
# the first request in it is not kept waiting behind thousands of round trips.
MAX_GROUP = 256
MAX_GROUP_ROWS = 2000
# Attempts for a batch that keeps losing races (unique violations, deadlocks).
MAX_ATTEMPTS = 5
# Rows per query when reading back; each page is one bounded statement.
READ_PAGE = 2000

_OPTIONS = ("schema", "pool_size", "statement_timeout")

# Version 1: everything the SQLite store's schema 3 holds. "{s}" is the quoted schema.
_MIGRATIONS: list[list[str]] = [
    [
        "CREATE TABLE IF NOT EXISTS {s}.schema_version (version integer NOT NULL)",
        """CREATE TABLE IF NOT EXISTS {s}.events (
            id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            source_id text COLLATE "C" NOT NULL,
            message_id text COLLATE "C" NOT NULL,
            type text COLLATE "C" NOT NULL,
            name text COLLATE "C",
            user_id text COLLATE "C",
            anonymous_id text COLLATE "C",
            timestamp text COLLATE "C" NOT NULL,
            received_at text COLLATE "C" NOT NULL,
            payload text NOT NULL,
            profile_id text COLLATE "C",
            session_id text COLLATE "C",
            warnings text,
            UNIQUE (source_id, message_id)
        )""",
        "CREATE INDEX IF NOT EXISTS events_source ON {s}.events (source_id, id)",
        "CREATE INDEX IF NOT EXISTS events_received ON {s}.events (received_at)",
        "CREATE INDEX IF NOT EXISTS events_profile ON {s}.events (profile_id, id)",
        "CREATE INDEX IF NOT EXISTS events_flagged ON {s}.events (source_id, id)"
        " WHERE warnings IS NOT NULL",
        """CREATE TABLE IF NOT EXISTS {s}.rejections (
            id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            source_id text COLLATE "C",
            reason text COLLATE "C" NOT NULL,
            message text NOT NULL,
            received_at text COLLATE "C" NOT NULL,
            endpoint text NOT NULL,
            payload text NOT NULL,
            idx bigint,
            message_id text COLLATE "C"
        )""",
        "CREATE INDEX IF NOT EXISTS rejections_source ON {s}.rejections (source_id, id)",
        "CREATE INDEX IF NOT EXISTS rejections_received ON {s}.rejections (received_at)",
        """CREATE TABLE IF NOT EXISTS {s}.claims (
            source_id text COLLATE "C" NOT NULL,
            kind text COLLATE "C" NOT NULL,
            key text COLLATE "C" NOT NULL,
            until double precision,
            PRIMARY KEY (source_id, kind, key)
        )""",
        """CREATE TABLE IF NOT EXISTS {s}.profiles (
            id text COLLATE "C" PRIMARY KEY,
            scope text COLLATE "C" NOT NULL,
            created_at double precision NOT NULL,
            traits text NOT NULL,
            merged_into text COLLATE "C"
        )""",
        "CREATE INDEX IF NOT EXISTS profiles_merged ON {s}.profiles (merged_into)"
        " WHERE merged_into IS NOT NULL",
        """CREATE TABLE IF NOT EXISTS {s}.identities (
            scope text COLLATE "C" NOT NULL,
            kind text COLLATE "C" NOT NULL,
            value text COLLATE "C" NOT NULL,
            profile_id text COLLATE "C" NOT NULL,
            PRIMARY KEY (scope, kind, value)
        )""",
        "CREATE INDEX IF NOT EXISTS identities_profile ON {s}.identities (profile_id)",
        """CREATE TABLE IF NOT EXISTS {s}.sessions (
            id text COLLATE "C" PRIMARY KEY,
            profile_id text COLLATE "C" NOT NULL,
            started_at double precision NOT NULL,
            last_seen double precision NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS sessions_profile ON {s}.sessions (profile_id, last_seen)",
    ],
    # Version 2: each event and rejection keeps the id of the transaction that wrote it,
    # and rows are read in (xact_id, id) order (see _select). Rows written before keep 0
    # and so come first, in id order. The orderings' indexes gain the column.
    [
        "ALTER TABLE {s}.events ADD COLUMN xact_id xid8 NOT NULL DEFAULT '0'",
        "ALTER TABLE {s}.events ALTER COLUMN xact_id SET DEFAULT pg_current_xact_id()",
        "ALTER TABLE {s}.rejections ADD COLUMN xact_id xid8 NOT NULL DEFAULT '0'",
        "ALTER TABLE {s}.rejections ALTER COLUMN xact_id SET DEFAULT pg_current_xact_id()",
        "DROP INDEX {s}.events_source",
        "DROP INDEX {s}.events_profile",
        "DROP INDEX {s}.events_flagged",
        "DROP INDEX {s}.rejections_source",
        "CREATE INDEX events_order ON {s}.events (xact_id, id)",
        "CREATE INDEX events_source ON {s}.events (source_id, xact_id, id)",
        "CREATE INDEX events_profile ON {s}.events (profile_id, xact_id, id)",
        "CREATE INDEX events_flagged ON {s}.events (source_id, xact_id, id)"
        " WHERE warnings IS NOT NULL",
        "CREATE INDEX rejections_order ON {s}.rejections (xact_id, id)",
        "CREATE INDEX rejections_source ON {s}.rejections (source_id, xact_id, id)",
    ],
]

_EVENT_COLUMNS = (
    "id, source_id, message_id, type, name, user_id, anonymous_id, timestamp, received_at,"
    " payload, profile_id, session_id, warnings"
)
_REJECTION_COLUMNS = (
    "id, source_id, reason, message, received_at, endpoint, payload, idx, message_id"
)

_STATEMENTS = {
    "insert_event": (
        "INSERT INTO {s}.events (source_id, message_id, type, name, user_id, anonymous_id,"
        " timestamp, received_at, payload, profile_id, session_id, warnings)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (source_id, message_id) DO NOTHING RETURNING id"
    ),
    "is_stored": "SELECT 1 FROM {s}.events WHERE source_id = %s AND message_id = %s",
    # Taken when free or expired; a held row is left alone and nothing is returned.
    "take_claim": (
        "INSERT INTO {s}.claims AS c (source_id, kind, key, until) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (source_id, kind, key) DO UPDATE SET until = excluded.until"
        " WHERE c.until IS NOT NULL AND c.until <= %s RETURNING 1"
    ),
    "insert_rejection": (
        "INSERT INTO {s}.rejections (source_id, reason, message, received_at, endpoint,"
        " payload, idx, message_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
    ),
    "owner": "SELECT profile_id FROM {s}.identities WHERE scope = %s AND kind = %s AND value = %s",
    "merged_into": "SELECT merged_into FROM {s}.profiles WHERE id = %s",
    "merged_into_locked": "SELECT merged_into FROM {s}.profiles WHERE id = %s FOR NO KEY UPDATE",
    "created_at": "SELECT created_at FROM {s}.profiles WHERE id = %s",
    "create_profile": (
        "INSERT INTO {s}.profiles (id, scope, created_at, traits) VALUES (%s, %s, %s, '{}')"
    ),
    "attach": "INSERT INTO {s}.identities (scope, kind, value, profile_id) VALUES (%s, %s, %s, %s)",
    "move_identities": "UPDATE {s}.identities SET profile_id = %s WHERE profile_id = %s",
    "move_sessions": "UPDATE {s}.sessions SET profile_id = %s WHERE profile_id = %s",
    "mark_merged": "UPDATE {s}.profiles SET merged_into = %s WHERE id = %s",
    "traits": "SELECT traits FROM {s}.profiles WHERE id = %s",
    "set_traits": "UPDATE {s}.profiles SET traits = %s WHERE id = %s",
    "latest_session": (
        "SELECT id, last_seen FROM {s}.sessions WHERE profile_id = %s"
        " ORDER BY last_seen DESC, id DESC LIMIT 1"
    ),
    "session_owner": "SELECT profile_id FROM {s}.sessions WHERE id = %s",
    "start_session": (
        "INSERT INTO {s}.sessions (id, profile_id, started_at, last_seen) VALUES (%s, %s, %s, %s)"
    ),
    "touch_session": ("UPDATE {s}.sessions SET last_seen = greatest(last_seen, %s) WHERE id = %s"),
    "profile": "SELECT scope, created_at, traits FROM {s}.profiles WHERE id = %s",
    "identities": (
        "SELECT kind, value FROM {s}.identities WHERE profile_id = %s AND scope = %s"
        " ORDER BY kind, value"
    ),
}

# Errors that mean "a concurrent transaction got there first": redo the batch.
_RACES = (
    pg_errors.UniqueViolation,
    pg_errors.DeadlockDetected,
    pg_errors.SerializationFailure,
)

_T = TypeVar("_T")
_Done = tuple[Commit, "list[Outcome] | BaseException"]
_Row = tuple[Any, ...]
_Cursor = psycopg.Cursor[_Row]
_Connection = psycopg.Connection[_Row]
_Run = Callable[[str, Sequence[object]], _Cursor]


# -- configuration ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PostgresOptions:
    """A storage URL split into what psycopg gets and what this store reads itself."""

    conninfo: str
    schema: str = DEFAULT_SCHEMA
    pool_size: int = DEFAULT_POOL_SIZE
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    # libpq parameters we default when neither the URL nor the environment sets them.
    defaults: tuple[tuple[str, str], ...] = ()


def parse_url(url: str) -> PostgresOptions:
    """Read this store's options out of ``url``; the rest is left byte for byte."""
    base, sep, query = url.partition("?")
    kept: list[str] = []
    ours: dict[str, str] = {}
    for piece in query.split("&") if sep else ():
        key, _, value = piece.partition("=")
        if unquote(key) in _OPTIONS:
            ours[unquote(key)] = unquote(value)
        elif piece:
            kept.append(piece)
    conninfo = base + ("?" + "&".join(kept) if kept else "")
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        raise ConfigError(f"invalid PostgreSQL URL: {exc}") from None
    defaults: list[tuple[str, str]] = []
    for name, env, value in (
        ("connect_timeout", "PGCONNECT_TIMEOUT", str(DEFAULT_CONNECT_TIMEOUT)),
        ("application_name", "PGAPPNAME", "fp-collect"),
        # Text is exchanged as UTF-8 whatever the server's or the user's default.
        ("client_encoding", "PGCLIENTENCODING", "UTF8"),
    ):
        if name not in params and env not in os.environ:
            defaults.append((name, value))
    try:
        connect_timeout = timeout_from_conninfo({**params, **dict(defaults)})
    except psycopg.Error as exc:
        raise ConfigError(f"invalid PostgreSQL URL: {exc}") from None
    schema = ours.get("schema", DEFAULT_SCHEMA)
    if not schema or len(schema.encode()) > 63 or "\x00" in schema or schema.startswith("pg_"):
        # Longer names would be silently truncated by PostgreSQL; pg_ is reserved.
        raise ConfigError(f"schema={schema!r}: use 1 to 63 bytes, not starting with 'pg_'")
    pool_size = ours.get("pool_size", str(DEFAULT_POOL_SIZE))
    if not (pool_size.isascii() and pool_size.isdigit() and int(pool_size) > 0):
        raise ConfigError(f"pool_size={pool_size!r} must be a positive whole number")
    return PostgresOptions(
        conninfo=conninfo,
        schema=schema,
        pool_size=int(pool_size),
        statement_timeout=_seconds(ours, "statement_timeout", DEFAULT_STATEMENT_TIMEOUT),
        connect_timeout=connect_timeout,
        defaults=tuple(defaults),
    )


def _seconds(ours: dict[str, str], name: str, default: float) -> float:
    if name not in ours:
        return default
    try:
        value = float(ours[name])
    except ValueError:
        value = 0.0
    # PostgreSQL takes timeouts as 32-bit milliseconds; NaN and infinity fail this too.
    if not 0 < value < 10**6:
        raise ConfigError(f"{name}={ours[name]!r} must be a positive number of seconds")
    return value


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _qualified(template: str, schema: str) -> str:
    return template.replace("{s}.", _quote(schema) + ".")


# -- NUL-safe text ------------------------------------------------------------------------

_ESCAPE = "\uffff"
_ESCAPED = re.compile(_ESCAPE + "(.)", re.DOTALL)


def escape_text(text: str) -> str:
    """Text PostgreSQL can store: U+0000 as U+FFFF "0", U+FFFF doubled. Reversible."""
    if "\x00" in text or _ESCAPE in text:
        return text.replace(_ESCAPE, _ESCAPE * 2).replace("\x00", _ESCAPE + "0")
    return text


def unescape_text(text: str) -> str:
    if _ESCAPE in text:
        return _ESCAPED.sub(lambda m: "\x00" if m[1] == "0" else m[1], text)
    return text


class _TextDumper(StrDumperUnknown):
    def dump(self, obj: str) -> Buffer | None:
        return escape_text(obj).encode(self._encoding)


class _TextLoader(TextLoader):
    def load(self, data: Buffer) -> bytes | str:
        text = super().load(data)
        return unescape_text(text) if isinstance(text, str) else text


_ADAPTERS = AdaptersMap(psycopg.adapters)
_ADAPTERS.register_dumper(str, _TextDumper)
for _type in ("text", "varchar", "bpchar", "name"):
    _ADAPTERS.register_loader(_type, _TextLoader)


# -- the watchdog -------------------------------------------------------------------------


class _Watch:
    """One connection being watched: shut down if it stays silent past ``deadline``."""

    __slots__ = ("_sock", "deadline", "fired", "timeout")

    def __init__(self, conn: _Connection, timeout: float) -> None:
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.fired = False
        # A duplicate descriptor: it names this socket even if the connection closes
        # its own and the number is reused, so we can never shut down a stranger.
        self._sock = socket.socket(fileno=os.dup(conn.fileno()))

    def extend(self) -> None:
        """A statement is about to be sent: the server has ``timeout`` to answer it."""
        self.deadline = time.monotonic() + self.timeout

    def fire(self) -> None:
        # shutdown() wakes the thread blocked on the socket with an error; psycopg then
        # marks the connection broken and we discard it. Nothing is freed under it.
        self.fired = True
        with suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._sock.close()


class _Watchdog:
    """A thread that ends connections whose server stopped answering.

    psycopg has no client-side timeout for a query, and a stalled network (or a proxy
    that accepts bytes and never forwards them) is not detected by TCP itself: without
    this, a commit could wait forever.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watches: set[_Watch] = set()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="fp-collect-pg-watch", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, conn: _Connection, timeout: float) -> Iterator[_Watch]:
        watch = _Watch(conn, timeout)
        with self._cond:
            self._watches.add(watch)
            self._cond.notify()
        try:
            yield watch
        finally:
            with self._cond:
                self._watches.discard(watch)
                watch.close()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                nearest: float | None = None
                for watch in list(self._watches):
                    if watch.deadline <= now:
                        watch.fire()
                        self._watches.discard(watch)
                    elif nearest is None or watch.deadline < nearest:
                        nearest = watch.deadline
                # Deadlines only move later without notice, so waking at the old one
                # and looking again is enough.
                self._cond.wait(None if nearest is None else nearest - now)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()


# -- the store ----------------------------------------------------------------------------


class _Race(Exception):
    """A batch lost a race with another transaction; it was rolled back, redo it."""


class _Unreachable(StoreUnavailable):
    """No answer from the server: no connection, or one that went silent."""


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
        self._sql = {name: _qualified(text, options.schema) for name, text in _STATEMENTS.items()}
        self._stall_timeout = options.statement_timeout + STALL_GRACE
        self._connect_kwargs: dict[str, Any] = dict(options.defaults)
        self._watchdog = _Watchdog()
        try:
            conn = self._connect()
            try:
                self._ensure_schema(conn, create)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            self._watchdog.stop()
            raise
        # Used only by whoever holds self._writes.writing: the writer thread, or a caller
        # of commit() writing its own batch (psycopg connections may change threads).
        self._conn: _Connection | None = conn
        self._pool: ConnectionPool[_Connection] = ConnectionPool(
            options.conninfo,
            kwargs={"autocommit": True, "context": _ADAPTERS, **self._connect_kwargs},
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
        self._writes = WriteQueue(f"PostgreSQL store {options.schema!r} is closed")
        self._writer = threading.Thread(target=self._run, name="fp-collect-postgres", daemon=True)
        self._writer.start()

    # -- connections ---------------------------------------------------------------------

    def _connect(self) -> _Connection:
        try:
            conn: _Connection = psycopg.Connection.connect(
                self.options.conninfo, autocommit=True, context=_ADAPTERS, **self._connect_kwargs
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

    def _configure(self, conn: _Connection) -> None:
        statement = str(int(self.options.statement_timeout * 1000))
        # The server waits on an idle transaction as long as we wait on the server: if
        # this process (or its network) stops mid-transaction, the session is ended and
        # its locks are freed for everyone else.
        idle = str(int(self._stall_timeout * 1000))
        with self._watchdog.watch(conn, self._stall_timeout):
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false),"
                " set_config('idle_in_transaction_session_timeout', %s, false)",
                (statement, idle),
            )

    def _check(self, conn: _Connection) -> None:
        """The pool's check on checkout: a dead (or silent) connection is replaced."""
        with self._watchdog.watch(conn, self._stall_timeout):
            conn.execute("")

    def _ensure_schema(self, conn: _Connection, create: bool) -> None:
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

                    def run(sql: str, params: Sequence[object] = ()) -> _Cursor:
                        watch.extend()
                        return cur.execute(_qualified(sql, schema), params)

                    with conn.transaction():
                        run("SELECT pg_advisory_xact_lock(%s)", (key,))
                        version = self._schema_version(conn)
                        exists = run("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
                        if exists.fetchone() is None:
                            # Looked up first: CREATE SCHEMA IF NOT EXISTS needs the
                            # right to create even when the schema is there.
                            run(f"CREATE SCHEMA IF NOT EXISTS {_quote(schema)}")
                        for step in _MIGRATIONS[version:SCHEMA_VERSION]:
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

    def _schema_version(self, conn: _Connection) -> int:
        table = _qualified("{s}.schema_version", self.options.schema)
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
        # written here is bounded by the statement and connect timeouts.
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
        """Commit ``group``; the error when the server could not be reached at all."""
        jobs = group
        races = 0
        while jobs:
            try:
                done, jobs, lost = self._commit_some(jobs)
            except Exception as exc:  # noqa: BLE001 - any failure here must reach every caller
                # The transaction is lost (rolled back by the server with the session):
                # every batch of it fails, and the next group starts on a new connection.
                self._drop_connection()
                unreachable = exc if isinstance(exc, _Unreachable) else None
                message = str(exc) if unreachable else f"PostgreSQL commit failed: {exc}"
                for job in jobs:
                    job.commit.set_exception(_unavailable(message, exc))
                return unreachable
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

    def _commit_some(self, jobs: list[Job]) -> tuple[list[_Done], list[Job], BaseException]:
        """Apply jobs in one transaction until one loses a race; commit those before it.
        Returns their results, the jobs left (the loser first) and why it lost."""
        conn = self._begin()
        done: list[_Done] = []
        left: list[Job] = []
        lost: BaseException = _Race()
        with self._watchdog.watch(conn, self._stall_timeout) as watch:
            cur = conn.cursor()

            def run(sql: str, params: Sequence[object] = ()) -> _Cursor:
                watch.extend()
                return cur.execute(sql, params)

            try:
                for n, job in enumerate(jobs):
                    try:
                        done.append((job.commit, self._apply_in_savepoint(conn, run, job.batch)))
                    except _Race as race:
                        left, lost = jobs[n:], race.__cause__ or race
                        break
                run("COMMIT", ())
            except Exception as exc:
                if watch.fired:
                    raise _Unreachable(
                        f"PostgreSQL did not answer within {self._stall_timeout:g} s"
                    ) from exc
                raise
        return done, left, lost

    def _begin(self) -> _Connection:
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
                except StoreUnavailable as exc:
                    raise _Unreachable(str(exc)) from exc.__cause__
            try:
                with self._watchdog.watch(self._conn, self._stall_timeout):
                    self._conn.execute("BEGIN")
                return self._conn
            except psycopg.Error as exc:
                self._drop_connection()
                if not retry:
                    raise _Unreachable(f"PostgreSQL is unavailable: {exc}") from exc
                retry = False

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with suppress(Exception):
                self._conn.close()  # a transaction left open is rolled back by the server
            self._conn = None

    def _apply_in_savepoint(
        self, conn: _Connection, run: _Run, batch: Batch
    ) -> list[Outcome] | BaseException:
        run("SAVEPOINT batch", ())
        try:
            outcomes = self._apply(run, batch)
        except Exception as exc:  # reported on this batch's commit only
            if conn.broken or conn.info.transaction_status not in (
                TransactionStatus.INTRANS,
                TransactionStatus.INERROR,
            ):
                raise  # the connection is gone, and the other batches with it
            run("ROLLBACK TO SAVEPOINT batch", ())
            run("RELEASE SAVEPOINT batch", ())
            if isinstance(exc, _Race):
                raise
            if isinstance(exc, _RACES):
                raise _Race() from exc
            return _unavailable(f"batch not stored: {exc}", exc)
        run("RELEASE SAVEPOINT batch", ())
        return outcomes

    def _apply(self, run: _Run, batch: Batch) -> list[Outcome]:
        outcomes = [self._apply_event(run, event) for event in batch.events]
        refused = refused_records(batch, outcomes)
        for r in (*refused, *batch.rejections):
            run(
                self._sql["insert_rejection"],
                (r.source_id, r.reason, r.message, r.received_at, r.endpoint, r.payload, r.index,
                 r.message_id),
            )  # fmt: skip
        return outcomes

    def _apply_event(self, run: _Run, event: EventRecord) -> Outcome:
        sql = self._sql
        warnings = dumps(list(event.warnings)) if event.warnings else None
        if not event.claims and event.identity is None:
            # No side effects: the unique index alone decides, in one statement.
            row = run(sql["insert_event"], _event_row(event, None, None, warnings)).fetchone()
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
        profile_id = session_id = None
        if event.identity is not None:
            graph = _PGGraph(run, sql, lock=True)
            profile_id = resolve_profile(graph, event.identity)
            if profile_id is None:
                self._undo(run, undo)
                return UNKNOWN_USER
            if event.session is not None:
                session_id = resolve_session(graph, event.session, profile_id)
        inserted = run(sql["insert_event"], _event_row(event, profile_id, session_id, warnings))
        if inserted.fetchone() is None:
            # Another transaction stored this message after our check: undo everything
            # this batch did and redo it, when the check will see that copy.
            raise _Race(f"message {event.message_id!r} was stored meanwhile")
        if undo:
            run("RELEASE SAVEPOINT event", ())
        return STORED if profile_id is None else Outcome(True, None, profile_id, session_id)

    def _is_stored(self, run: _Run, event: EventRecord) -> bool:
        found = run(self._sql["is_stored"], (event.source_id, event.message_id)).fetchone()
        return found is not None

    @staticmethod
    def _undo(run: _Run, undo: bool) -> None:
        if undo:
            run("ROLLBACK TO SAVEPOINT event", ())
            run("RELEASE SAVEPOINT event", ())

    # -- reading -------------------------------------------------------------------------

    def events(self, query: Query = Query()) -> Iterator[StoredEvent]:
        rows = self._select("events", _EVENT_COLUMNS, "type", query)
        return (_stored_event(row) for row in rows)

    def rejections(self, query: Query = Query()) -> Iterator[StoredRejection]:
        rows = self._select("rejections", _REJECTION_COLUMNS, "reason", query)
        return (StoredRejection(*row) for row in rows)

    def profile(self, profile_id: str) -> StoredProfile | None:
        def read(conn: _Connection, run: _Run) -> StoredProfile | None:
            with conn.transaction():  # one consistent view of a profile being merged
                canonical = _PGGraph(run, self._sql, lock=False).canonical(profile_id)
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

    def _select(self, table: str, columns: str, type_column: str, query: Query) -> Iterator[_Row]:
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
        sql = _qualified(
            f"SELECT {columns} FROM {{s}}.{table} WHERE {' AND '.join(where)}"
            " ORDER BY xact_id, id LIMIT %s",
            self.options.schema,
        )

        def page(after_id: int, size: int) -> list[_Row]:
            return self._read(
                lambda conn, run: run(sql, (after_id, after_id, *params, size)).fetchall()
            )

        # Pages of bounded size, each its own short statement, so a large read never
        # runs into the statement timeout; the first is read now so that an unavailable
        # store is reported by this call, as by the other backends.
        size = READ_PAGE if query.limit is None else min(READ_PAGE, query.limit)
        first = page(query.after_id, size) if size else []

        def pages() -> Iterator[_Row]:
            rows, remaining = first, query.limit
            while rows:
                yield from rows
                if remaining is not None:
                    remaining -= len(rows)
                if len(rows) < size or remaining == 0:
                    return
                rows = page(rows[-1][0], size if remaining is None else min(size, remaining))

        return pages()

    def _read(self, read: Callable[[_Connection, _Run], _T]) -> _T:
        try:
            with (
                self._read_connection() as conn,
                self._watchdog.watch(conn, self._stall_timeout) as watch,
            ):
                cur = conn.cursor()

                def run(sql: str, params: Sequence[object] = ()) -> _Cursor:
                    watch.extend()
                    return cur.execute(sql, params)

                return read(conn, run)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"PostgreSQL read failed: {exc}") from exc

    @contextmanager
    def _read_connection(self) -> Iterator[_Connection]:
        if not self._pool.closed:
            with self._pool.connection() as conn:
                yield conn
            return
        # After close, what is stored stays readable (as with every backend), on a
        # connection of its own.
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Commit everything already submitted, stop the writer, close every connection."""
        if not self._writes.close():
            return  # closed already
        if threading.current_thread() is not self._writer:
            self._writer.join()
        self._pool.close()
        self._watchdog.stop()


def _event_row(
    event: EventRecord, profile_id: str | None, session_id: str | None, warnings: str | None
) -> tuple[object, ...]:
    return (
        event.source_id, event.message_id, event.type, event.name, event.user_id,
        event.anonymous_id, event.timestamp, event.received_at, event.payload, profile_id,
        session_id, warnings,
    )  # fmt: skip


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


class _PGGraph:
    """The identity primitives over the writer's transaction (or a read's).

    With ``lock``, following a profile locks its row until the transaction ends, which
    is what serialises concurrent events, merges and sessions of one person.
    """

    def __init__(self, run: _Run, sql: dict[str, str], *, lock: bool) -> None:
        self._run = run
        self._sql = sql
        self._merged_into = sql["merged_into_locked" if lock else "merged_into"]

    def _one(self, name: str, params: tuple[object, ...]) -> Any:
        row = self._run(self._sql[name], params).fetchone()
        return None if row is None else row[0]

    def owner(self, scope: str, identity: Identity) -> str | None:
        owner: str | None = self._one("owner", (scope, identity.kind, identity.value))
        return owner

    def canonical(self, profile_id: str) -> str | None:
        current = profile_id
        for _ in range(1000):  # merge chains are short; a cycle would be a bug
            row = self._run(self._merged_into, (current,)).fetchone()
            if row is None:
                return None
            if row[0] is None:
                return current
            current = row[0]
        raise RuntimeError(f"profile {profile_id!r}: merge chain too long")

    def created_at(self, profile_id: str) -> float:
        created: float = self._one("created_at", (profile_id,))
        return created

    def create_profile(self, profile_id: str, scope: str, at: float) -> None:
        self._run(self._sql["create_profile"], (profile_id, scope, at))

    def attach(self, scope: str, identity: Identity, profile_id: str) -> None:
        self._run(self._sql["attach"], (scope, identity.kind, identity.value, profile_id))

    def merge(self, survivor: str, merged: str) -> None:
        self._run(self._sql["move_identities"], (survivor, merged))
        self._run(self._sql["move_sessions"], (survivor, merged))
        gone = ujson.loads(self._one("traits", (merged,)))
        kept = ujson.loads(self._one("traits", (survivor,)))
        self._run(self._sql["set_traits"], (dumps({**gone, **kept}), survivor))
        self._run(self._sql["mark_merged"], (survivor, merged))

    def update_traits(self, profile_id: str, traits: dict[str, object]) -> None:
        current = ujson.loads(self._one("traits", (profile_id,)))
        self._run(self._sql["set_traits"], (dumps({**current, **traits}), profile_id))

    def latest_session(self, profile_id: str) -> tuple[str, float] | None:
        row = self._run(self._sql["latest_session"], (profile_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def session_owner(self, session_id: str) -> str | None:
        owner: str | None = self._one("session_owner", (session_id,))
        return owner

    def start_session(self, session_id: str, profile_id: str, at: float) -> None:
        self._run(self._sql["start_session"], (session_id, profile_id, at, at))

    def touch_session(self, session_id: str, at: float) -> None:
        self._run(self._sql["touch_session"], (at, session_id))
