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

from fp_collect.store.sqlite.sql import SCHEMA_VERSION
from fp_collect.store.sqlite.store import MAX_GROUP, SQLiteStore

__all__ = ["MAX_GROUP", "SCHEMA_VERSION", "SQLiteStore"]
