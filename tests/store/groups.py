"""What the stores' own tests share: random groups of batches for the group-commit
property tests (each store's writer must decide a group as the memory store decides its
batches one at a time), a way to hold the writer thread, and the threaded write checks
every store with a writer thread must pass."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from hypothesis import strategies as st

from fp_collect.store import DUPLICATE, STORED, Batch, Claim, EventRecord, Outcome
from fp_collect.store.base import Identity, IdentityOp, SessionOp, Store


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
    traits: dict[str, st.SearchStrategy[object]] = {"n": st.integers(0, 3)}  # as IdentityOp's
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
            traits=draw(st.none() | st.fixed_dictionaries(traits)),
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


# How long a committed row may stay hidden from a PostgreSQL reader (see below).
VISIBLE_WITHIN = 30.0


def assert_stored_as_memory(store: Store, memory: Store, outcomes: list[list[Outcome]]) -> None:
    """``store`` holds what ``memory`` holds: the same events (with their profiles and
    sessions), the same rejections, and the same profiles for every id in ``outcomes``."""

    def rows(source: Store) -> list[tuple[str, str | None, str | None]]:
        return [(r.message_id, r.profile_id, r.session_id) for r in source.events()]

    def reasons(source: Store) -> list[str]:
        return [r.reason for r in source.rejections()]

    # PostgreSQL's readers show a row only once every transaction older than it, anywhere
    # on the (shared) server, has ended: give another session's open transaction time.
    deadline = time.monotonic() + VISIBLE_WITHIN
    while (rows(store), reasons(store)) != (rows(memory), reasons(memory)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert rows(store) == rows(memory)
    assert reasons(store) == reasons(memory)
    for profile_id in {o.profile_id for batch in outcomes for o in batch if o.profile_id}:
        mine, theirs = store.profile(profile_id), memory.profile(profile_id)
        assert mine is not None and theirs is not None
        assert (mine.id, mine.scope, mine.created_at, mine.traits) == (
            theirs.id,
            theirs.scope,
            theirs.created_at,
            theirs.traits,
        )
        assert set(mine.identities) == set(theirs.identities)


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


THREAD_IDS = [f"m{i}" for i in range(200)]


def stored_by_threads(
    store: Any, make_event: Callable[[str], EventRecord], committing: str, timeout: float
) -> Counter[str]:
    """Eight threads write :data:`THREAD_IDS` in batches of ten; with ``committing ==
    "half"`` every other thread calls ``commit()`` (written in its own thread when nobody
    else is writing, else handed to the writer thread), the others ``submit()``. How
    often each id was answered stored: dedup holds when each is once."""

    def write_all(worker: int) -> list[Outcome]:
        batches = [
            Batch(events=[make_event(i) for i in THREAD_IDS[n : n + 10]])
            for n in range(0, len(THREAD_IDS), 10)
        ]
        if committing == "half" and worker % 2:
            return [outcome for batch in batches for outcome in store.commit(batch, timeout)]
        futures = [store.submit(batch) for batch in batches]
        return [outcome for future in futures for outcome in future.result(timeout)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(write_all, range(8)))
    return Counter(
        i for outcomes in results for i, o in zip(THREAD_IDS, outcomes, strict=True) if o.stored
    )


def writers_of_lone_commits(
    store: Any, make_event: Callable[[str], EventRecord], timeout: float
) -> list[str]:
    """Commit one event twice (stored, then a duplicate) with nobody else writing; the
    names of the threads that ran the store's group commit for them."""
    writers: list[str] = []
    original = store._commit_group

    def recording(group: Any) -> Any:
        writers.append(threading.current_thread().name)
        return original(group)

    store._commit_group = recording
    try:
        assert store.commit(Batch(events=[make_event("m1")]), timeout) == [STORED]
        assert store.commit(Batch(events=[make_event("m1")]), timeout) == [DUPLICATE]
    finally:
        store._commit_group = original
    return writers


def race_on_a_few_visitors(stores: list[Any], threads: int = 6, rounds: int = 30) -> Counter[str]:
    """Several writers (``stores``, each used by ``threads / len(stores)`` threads) send
    small batches on a handful of visitors: merges, sessions and repeated messageIds
    all conflicting; odd rounds call commit(), even ones submit(). The messageIds the
    stores answered as stored, counted (each must be 1)."""

    def send(store: Any, thread: int) -> list[tuple[str, Outcome]]:
        rng = random.Random(thread)
        done: list[tuple[str, Outcome]] = []
        for i in range(rounds):
            events = []
            for k in range(rng.randint(1, 3)):
                at = float(rng.randint(0, 8) * 1000)
                op = IdentityOp(
                    scope="ws",
                    at=at,
                    identities=tuple(rng.sample(POOL, rng.randint(1, 2))),
                    merge=rng.random() < 0.3,
                    new_profile_id=f"PR-{thread}-{i}-{k}",
                    traits={"t": thread},
                )
                session = SessionOp(at, 1800.0, f"SE-{thread}-{i}-{k}")
                events.append(event(f"m{rng.randint(0, 60)}", identity=op, session=session))
            batch = Batch(events=events)
            outcomes = store.commit(batch, 60) if i % 2 else store.submit(batch).result(60)
            done += zip((e.message_id for e in events), outcomes, strict=True)
        return done

    with ThreadPoolExecutor(threads) as pool:
        writers = [stores[n % len(stores)] for n in range(threads)]
        sent = list(pool.map(send, writers, range(threads)))
    return Counter(m for results in sent for m, outcome in results if outcome.stored)
