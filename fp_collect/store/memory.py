"""``memory://``: an in-process store for tests and experiments. Nothing survives exit."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import islice

from fp_collect.errors import StoreUnavailable
from fp_collect.store.base import (
    DUPLICATE,
    STORED,
    Batch,
    EventRecord,
    Outcome,
    Query,
    RejectionRecord,
    Store,
    StoredEvent,
    StoredRejection,
    claim_is_held,
    resolved,
)


@dataclass(slots=True)
class _ClaimState:
    until: float | None


class MemoryStore(Store):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[StoredEvent] = []
        self._rejections: list[StoredRejection] = []
        self._message_ids: set[tuple[str, str]] = set()
        self._claims: dict[tuple[str, str, str], _ClaimState] = {}
        self._closed = False

    def submit(self, batch: Batch) -> Future[list[Outcome]]:
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the store is closed")
            outcomes = [self._apply_event(event) for event in batch.events]
            for rejection in batch.rejections:
                self._add_rejection(rejection)
        return resolved(outcomes)

    def _apply_event(self, event: EventRecord) -> Outcome:
        dedup_key = (event.source_id, event.message_id)
        if dedup_key in self._message_ids:
            self._reject_event(event, DUPLICATE)
            return DUPLICATE
        for claim in event.claims:
            state = self._claims.get((event.source_id, claim.kind, claim.key))
            if state is not None and claim_is_held(state.until, claim.at):
                outcome = Outcome(False, claim.kind)
                self._reject_event(event, outcome)
                return outcome
        for claim in event.claims:
            self._claims[(event.source_id, claim.kind, claim.key)] = _ClaimState(claim.until)
        self._message_ids.add(dedup_key)
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
            )
        )
        return STORED

    def _reject_event(self, event: EventRecord, outcome: Outcome) -> None:
        self._add_rejection(
            RejectionRecord(
                source_id=event.source_id,
                reason=outcome.reason or "rejected",
                message=f"not stored: {outcome.reason}",
                received_at=event.received_at,
                endpoint="",
                payload=event.payload,
                message_id=event.message_id,
            )
        )

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

    def events(self, query: Query = Query()) -> Iterator[StoredEvent]:
        with self._lock:
            rows = list(self._events)
        return islice((r for r in rows if _matches(query, r, r.type)), query.limit)

    def rejections(self, query: Query = Query()) -> Iterator[StoredRejection]:
        with self._lock:
            rows = list(self._rejections)
        return islice((r for r in rows if _matches(query, r, r.reason)), query.limit)


def _matches(query: Query, row: StoredEvent | StoredRejection, kind: str) -> bool:
    """``kind`` is what ``query.type`` filters: an event's type, a rejection's reason."""
    return (
        row.id > query.after_id
        and (query.source_id is None or row.source_id == query.source_id)
        and (query.type is None or kind == query.type)
        and (query.since is None or row.received_at >= query.since)
    )
