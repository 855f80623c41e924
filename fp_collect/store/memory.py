"""``memory://``: an in-process store for tests and experiments. Nothing survives exit."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import islice

from fp_collect.errors import StoreUnavailable
from fp_collect.store.base import (
    Batch,
    Commit,
    EventRecord,
    Identity,
    Outcome,
    Query,
    RejectionRecord,
    Store,
    StoredEvent,
    StoredProfile,
    StoredRejection,
    refused_record,
    resolved,
)
from fp_collect.store.decide import decide
from fp_collect.store.identity import traits_union


@dataclass(slots=True)
class _Profile:
    scope: str
    created_at: float
    traits: dict[str, object] = field(default_factory=dict)
    merged_into: str | None = None


@dataclass(slots=True)
class _Session:
    profile_id: str
    last_seen: float


class _Graph:
    """The identity primitives over the memory store's dicts (called under its lock)."""

    def __init__(self) -> None:
        self.profiles: dict[str, _Profile] = {}
        self.owners: dict[tuple[str, Identity], str] = {}
        self.sessions: dict[str, _Session] = {}

    def owner(self, scope: str, identity: Identity) -> str | None:
        return self.owners.get((scope, identity))

    def family(self, profile_id: str) -> set[str]:
        """The surviving profile of ``profile_id`` and every profile merged into it."""
        canonical = self.canonical(profile_id)
        if canonical is None:
            return set()
        return {p for p in self.profiles if self.canonical(p) == canonical}

    def canonical(self, profile_id: str) -> str | None:
        profile = self.profiles.get(profile_id)
        while profile is not None and profile.merged_into is not None:
            profile_id = profile.merged_into
            profile = self.profiles.get(profile_id)
        return profile_id if profile is not None else None

    def created_at(self, profile_id: str) -> float:
        return self.profiles[profile_id].created_at

    def scope_of(self, profile_id: str) -> str:
        return self.profiles[profile_id].scope

    def create_profile(self, profile_id: str, scope: str, at: float) -> None:
        self.profiles[profile_id] = _Profile(scope, at)

    def attach(self, scope: str, identity: Identity, profile_id: str) -> None:
        self.owners[(scope, identity)] = profile_id

    def merge(self, survivor: str, merged: str) -> None:
        for key, owner in self.owners.items():
            if owner == merged:
                self.owners[key] = survivor
        for session in self.sessions.values():
            if session.profile_id == merged:
                session.profile_id = survivor
        gone, kept = self.profiles[merged], self.profiles[survivor]
        if traits_union(gone.traits, kept.traits) is not None:  # else kept keeps its own
            kept.traits = {**gone.traits, **kept.traits}
        gone.merged_into = survivor

    def update_traits(self, profile_id: str, traits: dict[str, object]) -> None:
        profile = self.profiles[profile_id]
        if traits_union(profile.traits, traits) is not None:  # else it keeps its traits
            profile.traits.update(traits)

    def latest_session(self, profile_id: str) -> tuple[str, float] | None:
        mine = [(s.last_seen, i) for i, s in self.sessions.items() if s.profile_id == profile_id]
        if not mine:
            return None
        last_seen, session_id = max(mine)
        return session_id, last_seen

    def session_owner(self, session_id: str) -> str | None:
        session = self.sessions.get(session_id)
        return session.profile_id if session is not None else None

    def start_session(self, session_id: str, profile_id: str, at: float) -> None:
        self.sessions[session_id] = _Session(profile_id, at)

    def touch_session(self, session_id: str, at: float) -> None:
        session = self.sessions[session_id]
        session.last_seen = max(session.last_seen, at)


class MemoryStore(Store):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[StoredEvent] = []
        self._rejections: list[StoredRejection] = []
        self._message_ids: set[tuple[str, str]] = set()
        # The until of every claim taken (see decide).
        self._claims: dict[tuple[str, str, str], float | None] = {}
        self._closed = False
        self._graph = _Graph()

    def submit(self, batch: Batch) -> Commit:
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the store is closed")
            outcomes = [self._apply_event(event) for event in batch.events]
            for rejection in batch.rejections:
                self._add_rejection(rejection)
        return resolved(outcomes)

    def _apply_event(self, event: EventRecord) -> Outcome:
        outcome = decide(event, self._message_ids, self._claims, self._graph)
        if not outcome.stored:
            self._reject_event(event, outcome)
            return outcome
        self._events.append(
            StoredEvent(
                id=len(self._events) + 1,
                source_id=event.source_id,
                message_id=event.message_id,
                type=event.type,
                name=event.name,
                user_id=event.user_id,
                anonymous_id=event.anonymous_id,
                timestamp=event.timestamp,
                received_at=event.received_at,
                payload=event.payload,
                profile_id=outcome.profile_id,
                session_id=outcome.session_id,
                warnings=event.warnings,
            )
        )
        return outcome

    def _reject_event(self, event: EventRecord, outcome: Outcome) -> None:
        self._add_rejection(refused_record(event, outcome))

    def _add_rejection(self, rejection: RejectionRecord) -> None:
        self._rejections.append(
            StoredRejection(
                id=len(self._rejections) + 1,
                source_id=rejection.source_id,
                reason=rejection.reason,
                message=rejection.message,
                received_at=rejection.received_at,
                endpoint=rejection.endpoint,
                payload=rejection.payload,
                index=rejection.index,
                message_id=rejection.message_id,
            )
        )

    def close(self) -> None:
        # Like every backend: no commits after close; what is stored stays readable.
        with self._lock:
            self._closed = True

    def profile(self, profile_id: str) -> StoredProfile | None:
        with self._lock:
            canonical = self._graph.canonical(profile_id)
            if canonical is None:
                return None
            found = self._graph.profiles[canonical]
            identities = tuple(
                identity
                for (scope, identity), owner in self._graph.owners.items()
                if owner == canonical and scope == found.scope
            )
            return StoredProfile(
                canonical, found.scope, found.created_at, dict(found.traits), identities
            )

    def events(self, query: Query = Query()) -> Iterator[StoredEvent]:
        with self._lock:
            rows = list(self._events)
            if query.profile_id is not None:
                family = self._graph.family(query.profile_id)
                rows = [row for row in rows if row.profile_id in family]
                query = replace(query, profile_id=None)
        return islice((r for r in rows if _matches(query, r, r.type)), query.limit)

    def rejections(self, query: Query = Query()) -> Iterator[StoredRejection]:
        with self._lock:
            rows = list(self._rejections)
        return islice((r for r in rows if _matches(query, r, r.reason)), query.limit)


def _matches(query: Query, row: StoredEvent | StoredRejection, kind: str) -> bool:
    """``kind`` is what ``query.type`` filters: an event's type, a rejection's reason."""
    if isinstance(row, StoredEvent) and (
        (query.name is not None and row.name != query.name)
        or (query.profile_id is not None and row.profile_id != query.profile_id)
        or (query.flagged and not row.warnings)
    ):
        return False
    return (
        row.id > query.after_id
        and (query.source_id is None or row.source_id == query.source_id)
        and (query.type is None or kind == query.type)
        and (query.since is None or row.received_at >= query.since)
        and (query.until is None or row.received_at < query.until)
    )
