"""The storage contract every backend implements.

The core decides *what* to write and which claims each event needs; a backend only
applies a :class:`Batch` atomically and reports one :class:`Outcome` per event. That
is what keeps dedup exact across threads, processes and machines: the store decides.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
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
      when unknown and ``create`` allows it;
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
    # The path it came in on, kept with the rejection when the store refuses it.
    endpoint: str = ""


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

    ``after_id`` is a cursor: only rows with a larger id. Rows come in id order.
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


class Store(abc.ABC):
    """A storage backend. Thread-safe; one instance serves the whole process."""

    @abc.abstractmethod
    def submit(self, batch: Batch) -> Future[list[Outcome]]:
        """Queue ``batch`` for an atomic commit; the future resolves after it is durable.

        The future's result has one outcome per ``batch.events`` entry, in order. It
        raises :class:`~fp_collect.errors.StoreUnavailable` if the commit failed.
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

    def __enter__(self) -> Store:
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


def resolved(outcomes: Sequence[Outcome]) -> Future[list[Outcome]]:
    """A future that is already done, for stores that commit synchronously."""
    future: Future[list[Outcome]] = Future()
    future.set_result(list(outcomes))
    return future
