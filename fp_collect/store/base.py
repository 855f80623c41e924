"""The storage contract every backend implements.

The core decides *what* to write and which claims each event needs; a backend only
applies a :class:`Batch` atomically and reports one :class:`Outcome` per event. That
is what keeps dedup exact across threads, processes and machines: the store decides.
"""

from __future__ import annotations

import abc
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fp_collect.errors import StoreUnavailable

logger = logging.getLogger("fp_collect")


# Claim and Identity are built per event on the hot path and used as dict keys: hashed
# but not frozen, because a frozen dataclass's __init__ costs 2.5 times as much
# (0.53 against 0.20 µs). Treat them as immutable all the same.
@dataclass(slots=True, unsafe_hash=True)
class Claim:
    """A uniqueness claim an event must win to be stored.

    Within one source, only one event may hold ``(kind, key)`` at a time. A claim
    made at ``at`` (epoch seconds) holds until ``until``, or forever when ``until`` is
    None. An event whose claim is still held by an earlier one is not stored; it is
    recorded as a rejection with reason ``kind``.
    """

    kind: str
    key: str
    at: float
    until: float | None = None


@dataclass(slots=True, unsafe_hash=True)
class Identity:
    """One identifier of a person: ``kind`` is ``user_id``, ``anonymous_id`` or ``email``."""

    kind: str
    value: str


# Not frozen: one is built per event on the hot path, and a frozen dataclass's __init__
# costs three times as much. Treat it as immutable all the same.
@dataclass(slots=True)
class IdentityOp:
    """Which profile an event belongs to, resolved by the store in the event's transaction.

    Identities live in ``scope`` (a workspace): each (kind, value) belongs to at most one
    profile. The store resolves, in this order:

    * ``profile_id`` given: that profile (followed through merges); created with that id
      when unknown and ``create`` allows it (unknown, not created and with ``lookups``:
      as if no ``profile_id`` were given; so is a profile of another scope, always);
    * otherwise the profiles owning any of ``identities`` or ``lookups``. None: a new
      profile with id ``new_profile_id`` (unless ``create`` is False: the event is then
      refused as ``unknown_user``). Several: with ``merge`` (identify, alias) they become
      one, the oldest surviving; without, the first identity's profile is used. The
      store draws a new id itself unless ``new_profile_id`` names one (tests, imports).

    Then every identity not yet owned by a profile is attached to the result (``lookups``
    are only looked up, never attached), and ``traits`` are merged into its traits.
    """

    scope: str
    at: float
    identities: tuple[Identity, ...] = ()
    lookups: tuple[Identity, ...] = ()
    profile_id: str | None = None
    new_profile_id: str = ""
    create: bool = True
    merge: bool = False
    traits: dict[str, object] | None = None


@dataclass(slots=True)
class SessionOp:
    """Which session an event joins: ``session_id`` if given (created when unknown), else
    the profile's latest session when it was active within ``timeout`` seconds of ``at``,
    else a new session, with id ``new_session_id`` or one the store draws."""

    at: float
    timeout: float
    new_session_id: str = ""
    session_id: str | None = None


@dataclass(slots=True)
class EventRecord:
    """One accepted event, ready to write. ``payload`` is the JSON text kept verbatim."""

    source_id: str
    message_id: str
    type: str
    name: str | None
    user_id: str | None
    anonymous_id: str | None
    timestamp: str
    received_at: str
    payload: str
    claims: tuple[Claim, ...] = ()
    identity: IdentityOp | None = None
    # Only with an identity: sessions belong to profiles.
    session: SessionOp | None = None
    # Why the event is flagged though stored: rule errors, event-name guidelines.
    warnings: tuple[str, ...] = ()
    # The path it came in on, and its place in a batch: kept with the rejection when the
    # store refuses it (a duplicate, a restriction's claim).
    endpoint: str = ""
    index: int | None = None


@dataclass(slots=True)
class RejectionRecord:
    """Something refused, kept with its reason so nothing is silently lost.

    ``payload`` holds the raw text as received (the item, or the whole body when the
    request itself was refused). ``source_id`` is None when no source was resolved.
    """

    source_id: str | None
    reason: str
    message: str
    received_at: str
    endpoint: str
    payload: str
    index: int | None = None
    message_id: str | None = None


@dataclass(slots=True)
class Batch:
    """What one request asks the store to commit, all or nothing."""

    events: list[EventRecord] = field(default_factory=list)
    rejections: list[RejectionRecord] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one event: stored, or not stored and why; and, when the event had an
    identity, the profile (and session) it was resolved to."""

    stored: bool
    reason: str | None = None
    profile_id: str | None = None
    session_id: str | None = None


STORED = Outcome(True)
DUPLICATE = Outcome(False, "duplicate_message_id")
UNKNOWN_USER = Outcome(False, "unknown_user")


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: int
    source_id: str
    message_id: str
    type: str
    name: str | None
    user_id: str | None
    anonymous_id: str | None
    timestamp: str
    received_at: str
    payload: str
    profile_id: str | None = None
    session_id: str | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StoredProfile:
    """A person: their identities and the traits merged from identify calls."""

    id: str
    scope: str
    created_at: float
    traits: dict[str, object]
    identities: tuple[Identity, ...]


@dataclass(frozen=True, slots=True)
class StoredRejection:
    id: int
    source_id: str | None
    reason: str
    message: str
    received_at: str
    endpoint: str
    payload: str
    index: int | None
    message_id: str | None


@dataclass(frozen=True, slots=True)
class Query:
    """Filters for reading back. ``since`` (inclusive) and ``until`` (exclusive) compare
    with ``received_at`` (ISO, UTC, as the store writes it).

    ``after_id`` is a cursor, the id of the last row read: only rows after it. Rows come
    in id order, except in PostgreSQL, where rows written by several processes come in
    the order their transactions began (see :mod:`fp_collect.store.postgres`) so that a
    cursor never passes a row that is still to commit.
    ``type`` filters events by type and rejections by reason. ``name`` (the event's name),
    ``profile_id`` and ``flagged`` (only events stored with warnings) filter events only.
    ``profile_id`` follows merges, as :meth:`Store.profile` does: it selects the events
    of the surviving profile and of every profile merged into it, whichever of their ids
    is given.
    """

    source_id: str | None = None
    type: str | None = None
    since: str | None = None
    until: str | None = None
    name: str | None = None
    profile_id: str | None = None
    flagged: bool = False
    after_id: int = 0
    limit: int | None = None


class Pending(Protocol):
    """What :meth:`Store.submit` returns: the part of :class:`concurrent.futures.Future`
    the collector uses. The stores here return a :class:`Commit`; a store of one's own
    (or a test's) may return a ``Future[list[Outcome]]``."""

    def result(self, timeout: float | None = None) -> list[Outcome]: ...

    def exception(self, timeout: float | None = None) -> BaseException | None: ...

    def cancel(self) -> bool: ...

    def cancelled(self) -> bool: ...

    def done(self) -> bool: ...

    def add_done_callback(self, fn: Callable[[Any], object]) -> None: ...


# A Commit's states, as a Future's: PENDING until a writer takes it (RUNNING: it can no
# longer be cancelled), then CANCELLED or FINISHED for good.
_PENDING, _RUNNING, _CANCELLED, _FINISHED = "pending", "running", "cancelled", "finished"

# Orders the state changes that can race: cancel() in the waiting thread against the
# writer taking or settling the commit, add_done_callback() against settling. One lock
# for every Commit: each holds it for a few attribute writes, and under the GIL a lock
# per commit would buy no parallelism, only an allocation per request.
_TRANSITIONS = threading.Lock()


class Commit:
    """The pending commit of one batch: what the stores' :meth:`Store.submit` returns.

    It means what a :class:`concurrent.futures.Future` of ``list[Outcome]`` means, with
    the methods the collector and the stores use, at a fraction of the cost: one is
    made and settled per request. A Future builds a Condition (an RLock, a list of
    waiters) and takes it on every call; a Commit holds one plain lock from its
    creation until it is settled, which a thread blocked in :meth:`result` waits on.
    """

    __slots__ = ("_callbacks", "_settled", "_state", "_value")

    def __init__(self) -> None:
        self._state = _PENDING
        self._value: list[Outcome] | BaseException | None = None
        self._callbacks: list[Callable[[Commit], object]] = []
        # Released, never to be taken again, once the commit is settled or cancelled.
        self._settled = threading.Lock()
        self._settled.acquire()

    # -- the writer's side ----------------------------------------------------------------

    def set_running_or_notify_cancel(self) -> bool:
        """Take the commit for writing: False (write nothing) if it was cancelled."""
        with _TRANSITIONS:
            if self._state == _CANCELLED:
                return False
            if self._state != _PENDING:
                raise InvalidStateError(f"commit is already {self._state}")
            self._state = _RUNNING
            return True

    def set_result(self, outcomes: list[Outcome]) -> None:
        self._settle(outcomes)

    def set_exception(self, error: BaseException) -> None:
        self._settle(error)

    def settle(self, result: list[Outcome] | BaseException) -> None:
        """:meth:`set_exception` for an exception, else :meth:`set_result`."""
        self._settle(result)

    def _settle(self, value: list[Outcome] | BaseException) -> None:
        with _TRANSITIONS:
            if self._state in (_CANCELLED, _FINISHED):
                raise InvalidStateError(f"commit is already {self._state}")
            # The value first: _wait() reads the state without the lock.
            self._value = value
            self._state = _FINISHED
            callbacks, self._callbacks = self._callbacks, []
        self._settled.release()
        self._run(callbacks)

    # -- the waiter's side ----------------------------------------------------------------

    def cancel(self) -> bool:
        """Withdraw the batch if no writer has taken it yet; True if it is withdrawn."""
        with _TRANSITIONS:
            if self._state == _CANCELLED:
                return True
            if self._state != _PENDING:
                return False
            self._state = _CANCELLED
            callbacks, self._callbacks = self._callbacks, []
        self._settled.release()
        self._run(callbacks)
        return True

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def done(self) -> bool:
        return self._state in (_CANCELLED, _FINISHED)

    def result(self, timeout: float | None = None) -> list[Outcome]:
        """The outcomes, waiting at most ``timeout`` seconds (None: as long as it takes).

        Raises the commit's error, :class:`concurrent.futures.CancelledError` or, when
        it is not settled in time, :class:`concurrent.futures.TimeoutError`.
        """
        value = self._wait(timeout)
        if isinstance(value, BaseException):
            raise value
        return value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The commit's error (None when it succeeded), waiting as :meth:`result` does."""
        value = self._wait(timeout)
        return value if isinstance(value, BaseException) else None

    def add_done_callback(self, fn: Callable[[Commit], object]) -> None:
        """Call ``fn(commit)`` once it is settled or cancelled: at once if it is, else in
        the thread that settles it (the writer's: keep ``fn`` short and non-blocking)."""
        with _TRANSITIONS:
            if self._state not in (_CANCELLED, _FINISHED):
                self._callbacks.append(fn)
                return
        self._run([fn])

    def _wait(self, timeout: float | None) -> list[Outcome] | BaseException:
        if self._state not in (_CANCELLED, _FINISHED):
            if not self._settled.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
                raise FutureTimeout()
            self._settled.release()  # for whoever waits next
        if self._state == _CANCELLED:
            raise CancelledError()
        assert self._value is not None
        return self._value

    def _run(self, callbacks: list[Callable[[Commit], object]]) -> None:
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # as a Future does: one bad callback must not stop the rest
                logger.exception("a callback of a commit failed")

    def __repr__(self) -> str:
        return f"<Commit {self._state}>"


_SomeStore = TypeVar(
    "_SomeStore", bound="Store"
)  # ``with SQLiteStore(...) as store`` keeps its type


class Store(abc.ABC):
    """A storage backend. Thread-safe; one instance serves the whole process."""

    @abc.abstractmethod
    def submit(self, batch: Batch) -> Pending:
        """Queue ``batch`` for an atomic commit, settled once it is durable.

        Its result has one outcome per ``batch.events`` entry, in order. It raises
        :class:`~fp_collect.errors.StoreUnavailable` if the commit failed.
        """

    def commit(self, batch: Batch, timeout: float | None = None) -> list[Outcome]:
        """Commit ``batch`` and wait for it: the blocking form of :meth:`submit`."""
        return self.submit(batch).result(timeout)

    @abc.abstractmethod
    def events(self, query: Query = Query()) -> Iterator[StoredEvent]:
        """Stored events matching ``query``, in storage order."""

    @abc.abstractmethod
    def rejections(self, query: Query = Query()) -> Iterator[StoredRejection]:
        """Stored rejections matching ``query``, in storage order."""

    @abc.abstractmethod
    def profile(self, profile_id: str) -> StoredProfile | None:
        """The profile with this id, following merges to the surviving one; None if unknown."""

    def close(self) -> None:
        """Finish pending commits and release resources. Idempotent."""
        return None

    def __enter__(self: _SomeStore) -> _SomeStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def refused_record(event: EventRecord, outcome: Outcome) -> RejectionRecord:
    """The record every backend keeps of an event it did not store (``outcome``)."""
    return RejectionRecord(
        source_id=event.source_id,
        reason=outcome.reason or "rejected",
        message=f"not stored: {outcome.reason}",
        received_at=event.received_at,
        endpoint=event.endpoint,
        payload=event.payload,
        index=event.index,
        message_id=event.message_id,
    )


def refused_records(batch: Batch, outcomes: Sequence[Outcome]) -> list[RejectionRecord]:
    """:func:`refused_record` for each event of ``batch`` its outcome says was not stored."""
    return [
        refused_record(event, outcome)
        for event, outcome in zip(batch.events, outcomes, strict=True)
        if not outcome.stored
    ]


def claim_is_held(held_until: float | None, at: float) -> bool:
    """Whether a claim held until ``held_until`` still blocks a new one made at ``at``."""
    return held_until is None or held_until > at


def resolved(outcomes: Sequence[Outcome]) -> Commit:
    """A commit that is already settled, for stores that commit synchronously."""
    commit = Commit()
    commit.set_result(list(outcomes))
    return commit


@dataclass(slots=True)
class Job:
    """One submitted batch, and the commit that reports on it."""

    batch: Batch
    commit: Commit


# When (time.monotonic()) the store work a thread does for a waiting request must be
# over: a write WriteQueue.commit_here does in its caller's thread, or a read the collector
# serves. That request is answered 503 after its timeout and cannot be answered sooner
# than the work ends. None in every other context (the writer threads, a script reading).
_deadline: ContextVar[float | None] = ContextVar("fp_collect_deadline", default=None)


def time_left() -> float | None:
    """Seconds left for the store work this thread does for a waiting request (a write
    for a caller of :meth:`WriteQueue.commit_here`, a read under :func:`within`),
    negative once past, or None when it has no limit."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def request_deadline() -> float | None:
    """The ``time.monotonic()`` by which this thread's store work must be over (see
    :func:`time_left`), or None."""
    return _deadline.get()


@contextmanager
def within(timeout: float | None) -> Iterator[None]:
    """Bound the store work this thread does meanwhile by ``timeout`` seconds from now
    (None: no bound): each store bounds its own waits by :func:`time_left`."""
    token = _deadline.set(None if timeout is None else time.monotonic() + timeout)
    try:
        yield
    finally:
        _deadline.reset(token)


class _RestartsAfterFork(Protocol):
    def _after_fork(self) -> None: ...


# Stores that give a forked child a writer of its own (see restart_after_fork).
_FORK_AWARE: weakref.WeakSet[Any] = weakref.WeakSet()


def restart_after_fork(store: _RestartsAfterFork) -> None:
    """Have ``store._after_fork()`` run in every child forked from now on.

    gunicorn ``--preload`` makes the app, and so its store, in the master; each worker
    is a fork, and threads do not survive a fork: without a writer of its own, every
    batch a worker submits would wait in vain (an ASGI app's requests all answered 503).
    """
    _FORK_AWARE.add(store)


def _after_fork_in_child() -> None:
    for store in list(_FORK_AWARE):
        try:
            store._after_fork()
        except Exception:  # one store's failure must not cost the others
            logger.exception("fp-collect: a store could not restart its writer after fork")


os.register_at_fork(after_in_child=_after_fork_in_child)


class WriteQueue:
    """What stands between :meth:`Store.submit` and a store's one writer thread.

    ``submit`` only enqueues. The writer waits for a job, then takes everything else
    already queued as one group to commit in one transaction (group commit: one fsync,
    or one round trip, serves many concurrent requests). :meth:`close` lets the writer
    finish every batch submitted before it; a later ``submit`` raises
    :class:`StoreUnavailable` (not RuntimeError), so requests racing a graceful
    shutdown are answered 503, not 500.
    """

    def __init__(self, closed_message: str) -> None:
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._closed_message = closed_message
        # Held by whoever writes on the store's write connection: its writer thread (a
        # group at a time) or a caller of commit_here(). The connection is theirs meanwhile.
        self.writing = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, batch: Batch) -> Commit:
        commit = Commit()
        # The lock orders submit against close, so no job lands behind the stop sentinel.
        with self._lock:
            if self._closed:
                raise StoreUnavailable(self._closed_message)
            self._queue.put(Job(batch, commit))
        return commit

    def commit_here(
        self,
        batch: Batch,
        timeout: float | None,
        write: Callable[[list[Job]], object],
        longest_write: float | None = None,
    ) -> list[Outcome]:
        """:meth:`Store.commit` for a store with a writer thread: ``write`` (the store's
        group commit) writes ``batch`` in the calling thread when nobody is writing, else
        the batch goes to the writer thread like :meth:`submit`'s.

        A lone caller (Flask under a sync worker) so spares the two thread switches of
        handing its batch over and being woken; callers arriving during a write (gthread
        workers) still share the writer thread's next group.

        A write done here cannot be abandoned after ``timeout`` as a wait for the writer
        thread is, so the store must end it in time: while it runs, :func:`time_left`
        tells the store how long it has, and the store bounds its own waits by that. A
        store that cannot (``longest_write``: the longest its own timeouts let a write
        take) hands the batch to the writer thread whenever ``timeout`` is shorter.
        """
        if longest_write is not None and timeout is not None and timeout < longest_write:
            return self.submit(batch).result(timeout)
        if not self.writing.acquire(blocking=False):
            return self.submit(batch).result(timeout)
        try:
            with within(timeout):
                if self._closed:
                    raise StoreUnavailable(self._closed_message)
                commit = Commit()
                commit.set_running_or_notify_cancel()
                write([Job(batch, commit)])
        finally:
            self.writing.release()
        return commit.result(0)

    def close(self) -> bool:
        """Stop taking batches; the writer stops once it has taken the ones queued.
        True for the call that closed it, False for any later one."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self._queue.put(None)
            return True

    def next_group(self, max_jobs: int, max_rows: int | None = None) -> tuple[list[Job], bool]:
        """Wait for a job, then take what else is queued: the writer's next group, and
        whether :meth:`close` was called (stop after this group; it may be empty).

        A group holds at most ``max_jobs`` batches and, if given, stops growing once it
        holds ``max_rows`` events and rejections. Every job in it was taken for writing
        (``set_running_or_notify_cancel``): a batch whose commit was cancelled while it
        waited is dropped here, never written.
        """
        first = self._queue.get()
        if first is None:
            return [], True
        group: list[Job] = []
        rows = 0
        job: Job | None = first
        while job is not None:
            if job.commit.set_running_or_notify_cancel():
                group.append(job)
                rows += len(job.batch.events) + len(job.batch.rejections)
            if len(group) >= max_jobs or (max_rows is not None and rows >= max_rows):
                return group, False
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return group, False
        return group, True

    def take_all(self) -> tuple[list[Job], bool]:
        """Everything queued now, without waiting, each taken for writing as in
        :meth:`next_group` (to be failed at once); and whether :meth:`close` was called."""
        taken: list[Job] = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return taken, False
            if job is None:
                return taken, True
            if job.commit.set_running_or_notify_cancel():
                taken.append(job)
