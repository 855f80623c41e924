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
seconds, and writes resume by themselves once it answers again. A batch that
:meth:`PostgresStore.commit` writes in its caller's thread (a WSGI request's) fails by the
caller's own timeout when that is shorter: the watchdog ends a silent connection at that
deadline, each statement of the transaction gets the time left at BEGIN as its
statement_timeout, and a new connection is tried only for the time left (at least libpq's
shortest connect_timeout, 2 s, per host; and 2 s to set the session up).

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
  queue and commits many batches in one transaction. Commits are settled only after
  COMMIT returns. A blocking :meth:`PostgresStore.commit` (a WSGI request thread) writes
  its batch in its own thread when nobody else is writing, and otherwise joins the
  writer thread's next group.
* **Set-wise first** (``group.py``). A group of more than one event is looked up in one
  pipeline (stored message ids; claims and profiles, their rows locked; owners; latest
  sessions), decided in Python, and written in another, a table at a time: four round
  trips whatever its size. Whatever another writer did meanwhile that would change a
  decision either waits on our locks or shows on our writes (a RETURNING count short,
  a unique key violated); the group is then rolled back and redone batch at a time.
* **Batch at a time** (the fallback, and a single event's path): the batches of the
  group each inside its own SAVEPOINT, so a bad batch fails alone (a group of one batch
  needs none: its failure rolls back the whole transaction), each event's statements
  one after another, as described next.
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
    :class:`~fp_collect.store.postgres.graph.PGGraph`. Resolving a profile locks its row
    (``FOR NO KEY UPDATE``), which serialises all events, merges and sessions of one
    person; two first events of a new visitor both try to insert the identity and the
    unique key makes the second fail after the first commits, so its batch is redone and
    finds the first's profile. Lost races (unique violations, deadlocks) are retried a
    few times in a fresh transaction after committing the batches before them, so no
    lock of ours is held while waiting.

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

from fp_collect.store.postgres.options import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_POOL_SIZE,
    DEFAULT_SCHEMA,
    DEFAULT_STATEMENT_TIMEOUT,
    PostgresOptions,
    parse_url,
)
from fp_collect.store.postgres.sql import SCHEMA_VERSION
from fp_collect.store.postgres.store import PostgresStore
from fp_collect.store.postgres.text import escape_text, unescape_text

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_POOL_SIZE",
    "DEFAULT_SCHEMA",
    "DEFAULT_STATEMENT_TIMEOUT",
    "SCHEMA_VERSION",
    "PostgresOptions",
    "PostgresStore",
    "escape_text",
    "parse_url",
    "unescape_text",
]
