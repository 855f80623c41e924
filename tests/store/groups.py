"""Random groups of batches for the stores' group-commit property tests: each store's
writer must decide a group as the memory store decides its batches one at a time."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from hypothesis import strategies as st

from fp_collect.store import Batch, Claim, EventRecord
from fp_collect.store.base import Identity, IdentityOp, SessionOp, StoredProfile


def event(
    message_id: str,
    *,
    claims: tuple[Claim, ...] = (),
    identity: IdentityOp | None = None,
    session: SessionOp | None = None,
) -> EventRecord:
    return EventRecord(
        source_id="src",
        message_id=message_id,
        type="track",
        name="Order Completed",
        user_id="u1",
        anonymous_id=None,
        timestamp="2024-05-01T11:59:59.500Z",
        received_at="2024-05-01T12:00:00.000Z",
        payload=f'{{"messageId":"{message_id}","text":"héllo ✓"}}',
        claims=claims,
        identity=identity,
        session=session,
    )


POOL = [
    Identity("anonymous_id", "a-1"),
    Identity("anonymous_id", "a-2"),
    Identity("user_id", "u-1"),
    Identity("user_id", "u-2"),
    Identity("email", "ann@example.com"),
]


@st.composite
def random_events(draw: st.DrawFn) -> list[EventRecord]:
    """Events of a few visitors: identities, merges, lookups, explicit profiles and
    sessions, traits, claims and repeated messageIds, every id unique within the batch
    (the test makes them unique across batches) where the store would otherwise fail the
    batch (as SQL would) rather than pick one."""
    events = []
    for i in range(draw(st.integers(1, 14))):
        at = float(draw(st.integers(0, 6)) * 1000)
        op = IdentityOp(
            scope="ws",
            at=at,
            identities=tuple(draw(st.lists(st.sampled_from(POOL), max_size=3, unique=True))),
            lookups=tuple(draw(st.lists(st.sampled_from(POOL), max_size=1))),
            profile_id=draw(st.none() | st.sampled_from(["PX-1", "PX-2"])),
            new_profile_id=f"PR-{i}",
            create=draw(st.booleans()),
            merge=draw(st.booleans()),
            traits=draw(st.none() | st.fixed_dictionaries({"n": st.integers(0, 3)})),
        )
        session = draw(
            st.none()
            | st.builds(
                SessionOp,
                at=st.just(at),
                timeout=st.just(1800.0),
                new_session_id=st.just(f"SE-{i}"),
                session_id=st.none() | st.sampled_from(["SX-1", "SX-2"]),
            )
        )
        claims = draw(st.lists(st.sampled_from([Claim("order_id", "o-1", at=at),
                                                Claim("email_open", "e", at=at, until=at + 1500)]),
                               max_size=2, unique=True))  # fmt: skip
        message_id = draw(st.sampled_from([f"m{i}", "m-again"]))
        events.append(
            event(message_id, identity=op, session=session, claims=tuple(claims))
            if draw(st.booleans())
            else event(message_id, claims=tuple(claims))
        )
    return events


def offered_ids_of_batch(number: int, events: list[EventRecord]) -> list[EventRecord]:
    """The profile and session ids ``random_events`` offers, made unique across batches:
    an id offered twice is a caller's error that the stores report differently."""
    for event in events:
        if event.identity is not None:
            event.identity = replace(
                event.identity, new_profile_id=f"{event.identity.new_profile_id}-{number}"
            )
        if event.session is not None:
            event.session = replace(
                event.session, new_session_id=f"{event.session.new_session_id}-{number}"
            )
    return events


def same_profile(mine: StoredProfile | None, theirs: StoredProfile | None) -> bool:
    assert mine is not None and theirs is not None
    assert (mine.id, mine.scope, mine.created_at, mine.traits) == (
        theirs.id,
        theirs.scope,
        theirs.created_at,
        theirs.traits,
    )
    assert set(mine.identities) == set(theirs.identities)
    return True


@contextmanager
def held_writer(store: Any, timeout: float = 60) -> Iterator[None]:
    """Keep ``store``'s writer thread busy meanwhile, so that what is submitted makes one
    group (``timeout`` only guards against a hang)."""
    busy, release = threading.Event(), threading.Event()
    original = store._commit_group

    def hold(group: Any) -> None:
        store._commit_group = original
        busy.set()
        release.wait(timeout)
        original(group)

    store._commit_group = hold
    store.submit(Batch())
    assert busy.wait(timeout)
    try:
        yield
    finally:
        release.set()
