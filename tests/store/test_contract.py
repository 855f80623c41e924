"""The storage contract, run against every backend that needs no outside server."""

from __future__ import annotations

import multiprocessing

import pytest

from fp_collect.store import (
    DUPLICATE,
    STORED,
    Batch,
    Claim,
    EventRecord,
    Outcome,
    Query,
    RejectionRecord,
    Store,
)


def event(
    message_id: str,
    *,
    source_id: str = "src",
    type: str = "track",
    received_at: str = "2024-05-01T12:00:00.000Z",
    claims: tuple[Claim, ...] = (),
) -> EventRecord:
    return EventRecord(
        source_id=source_id,
        message_id=message_id,
        type=type,
        name="Order Completed" if type == "track" else None,
        user_id="u1",
        anonymous_id=None,
        timestamp="2024-05-01T11:59:59.500Z",
        received_at=received_at,
        payload=f'{{"messageId": "{message_id}", "text": "héllo ✓"}}',
        claims=claims,
    )


def rejection(reason: str, **fields: object) -> RejectionRecord:
    values: dict[str, object] = {
        "source_id": "src",
        "message": f"refused: {reason}",
        "received_at": "2024-05-01T12:00:00.000Z",
        "endpoint": "/v1/batch",
        "payload": "{not json",
    }
    values.update(fields)
    return RejectionRecord(reason=reason, **values)  # type: ignore[arg-type]


def message_ids(store: Store, query: Query = Query()) -> list[str]:
    return [row.message_id for row in store.events(query)]


def test_stored_event_round_trips_every_field(store: Store) -> None:
    record = event("m1")
    assert store.commit(Batch(events=[record])) == [STORED]
    [row] = store.events()
    assert row.id > 0
    for name in ("source_id", "message_id", "type", "name", "user_id", "anonymous_id"):
        assert getattr(row, name) == getattr(record, name)
    assert (row.timestamp, row.received_at) == (record.timestamp, record.received_at)
    assert row.payload == record.payload


def test_duplicate_in_one_batch_is_rejected_and_recorded(store: Store) -> None:
    first, again = event("m1"), event("m1")
    again.endpoint, again.index = "/v1/batch", 1
    assert store.commit(Batch(events=[first, again])) == [STORED, DUPLICATE]
    assert message_ids(store) == ["m1"]
    [row] = store.rejections()
    assert row.source_id == "src"
    assert row.reason == "duplicate_message_id"
    assert row.message == "not stored: duplicate_message_id"
    assert (row.received_at, row.endpoint) == (again.received_at, "/v1/batch")
    # Its place in the batch it came in, as for the events the collector refuses.
    assert (row.payload, row.index, row.message_id) == (again.payload, 1, "m1")


def test_duplicate_across_batches(store: Store) -> None:
    assert store.commit(Batch(events=[event("m1"), event("m2")])) == [STORED, STORED]
    assert store.commit(Batch(events=[event("m2"), event("m3")])) == [DUPLICATE, STORED]
    assert message_ids(store) == ["m1", "m2", "m3"]


def test_same_message_id_in_two_sources_is_stored_twice(store: Store) -> None:
    batch = Batch(events=[event("m1", source_id="a"), event("m1", source_id="b")])
    assert store.commit(batch) == [STORED, STORED]
    assert [row.source_id for row in store.events()] == ["a", "b"]


def test_forever_claim_blocks_a_second_event(store: Store) -> None:
    def order(message_id: str, at: float) -> EventRecord:
        return event(message_id, claims=(Claim("order_id", "o-1", at=at),))

    assert store.commit(Batch(events=[order("m1", 100.0)])) == [STORED]
    blocked = Outcome(False, "order_id")
    assert store.commit(Batch(events=[order("m2", 1e12)])) == [blocked]
    assert message_ids(store) == ["m1"]
    [row] = store.rejections()
    assert (row.reason, row.message_id, row.message) == ("order_id", "m2", "not stored: order_id")
    # The claim is per source.
    other = event("m3", source_id="other", claims=(Claim("order_id", "o-1", at=200.0),))
    assert store.commit(Batch(events=[other])) == [STORED]


def test_windowed_claim_blocks_until_it_expires(store: Store) -> None:
    def opened(message_id: str, at: float) -> EventRecord:
        return event(message_id, claims=(Claim("email_open", "u1:e1", at=at, until=at + 60),))

    outcomes = store.commit(
        Batch(events=[opened("m1", 100.0), opened("m2", 159.9), opened("m3", 160.0)])
    )
    # Held while until > at: expired exactly at 160, and m3 then holds it until 220.
    assert outcomes == [STORED, Outcome(False, "email_open"), STORED]
    assert store.commit(Batch(events=[opened("m4", 219.0), opened("m5", 220.0)])) == [
        Outcome(False, "email_open"),
        STORED,
    ]
    assert message_ids(store) == ["m1", "m3", "m5"]
    assert [row.reason for row in store.rejections()] == ["email_open", "email_open"]


def test_a_refused_event_takes_none_of_its_claims(store: Store) -> None:
    taken, free = Claim("k", "taken", at=1.0), Claim("k", "free", at=1.0)
    assert store.commit(Batch(events=[event("m1", claims=(taken,))])) == [STORED]
    assert store.commit(Batch(events=[event("m2", claims=(free, taken))])) == [Outcome(False, "k")]
    assert store.commit(Batch(events=[event("m3", claims=(free,))])) == [STORED]


def test_duplicate_wins_over_a_held_claim(store: Store) -> None:
    claim = Claim("order_id", "o-1", at=1.0)
    batch = Batch(events=[event("m1", claims=(claim,)), event("m1", claims=(claim,))])
    assert store.commit(batch) == [STORED, DUPLICATE]


def test_rejections_round_trip_after_event_rejections(store: Store) -> None:
    full = rejection("invalid_event", index=3, message_id="m9")
    bare = rejection("unknown_write_key", source_id=None, endpoint="/events/track")
    batch = Batch(events=[event("m1"), event("m1")], rejections=[full, bare])
    assert store.commit(batch) == [STORED, DUPLICATE]
    rows = list(store.rejections())
    assert [row.reason for row in rows] == ["duplicate_message_id", "invalid_event", bare.reason]
    assert rows[0].id < rows[1].id < rows[2].id
    for row, record in zip(rows[1:], (full, bare), strict=True):
        assert (row.source_id, row.reason, row.message, row.received_at) == (
            record.source_id,
            record.reason,
            record.message,
            record.received_at,
        )
        assert (row.endpoint, row.payload, row.index, row.message_id) == (
            record.endpoint,
            record.payload,
            record.index,
            record.message_id,
        )


def test_event_query_filters_and_order(store: Store) -> None:
    store.commit(
        Batch(
            events=[
                event("m1", source_id="a", received_at="2024-05-01T10:00:00.000Z"),
                event("m2", source_id="b", type="identify", received_at="2024-05-01T11:00:00Z"),
                event("m3", source_id="a", type="identify", received_at="2024-05-01T12:00:00Z"),
            ]
        )
    )
    store.commit(Batch(events=[event("m4", source_id="a", received_at="2024-05-01T13:00:00Z")]))
    rows = list(store.events())
    assert [row.message_id for row in rows] == ["m1", "m2", "m3", "m4"]
    assert [row.id for row in rows] == sorted({row.id for row in rows})
    assert message_ids(store, Query(source_id="a")) == ["m1", "m3", "m4"]
    assert message_ids(store, Query(type="identify")) == ["m2", "m3"]
    assert message_ids(store, Query(since="2024-05-01T11:00:00Z")) == ["m2", "m3", "m4"]
    assert message_ids(store, Query(after_id=rows[1].id)) == ["m3", "m4"]
    assert message_ids(store, Query(limit=2)) == ["m1", "m2"]
    assert message_ids(store, Query(limit=0)) == []
    assert message_ids(store, Query(source_id="a", after_id=rows[0].id, limit=1)) == ["m3"]
    assert message_ids(store, Query(source_id="nobody")) == []


def test_rejection_query_filters(store: Store) -> None:
    store.commit(
        Batch(
            rejections=[
                rejection("too_large", source_id="a", received_at="2024-05-01T10:00:00Z"),
                rejection("invalid_event", source_id="b", received_at="2024-05-01T11:00:00Z"),
                rejection("too_large", source_id=None, received_at="2024-05-01T12:00:00Z"),
            ]
        )
    )
    rows = list(store.rejections())

    def sources(query: Query) -> list[str | None]:
        return [row.source_id for row in store.rejections(query)]

    assert sources(Query()) == ["a", "b", None]
    assert sources(Query(source_id="b")) == ["b"]
    assert sources(Query(type="too_large")) == ["a", None]
    assert sources(Query(since="2024-05-01T11:00:00Z")) == ["b", None]
    assert sources(Query(after_id=rows[0].id, limit=1)) == ["b"]


def test_empty_batch(store: Store) -> None:
    assert store.commit(Batch()) == []
    assert list(store.events()) == []
    assert list(store.rejections()) == []


def test_commit_equals_submit_result(store: Store) -> None:
    future = store.submit(Batch(events=[event("m1"), event("m1")]))
    assert future.result(timeout=30) == [STORED, DUPLICATE]
    assert store.commit(Batch(events=[event("m1")]), timeout=30) == [DUPLICATE]


def _write_in_a_fork(store: Store, name: str) -> None:
    """A forked worker's requests: an ASGI one (submit) and a WSGI one (commit)."""
    # 20 s only guards against a hang: without a writer, this is where a child waits.
    assert store.submit(Batch(events=[event(f"{name}-submitted")])).result(20) == [STORED]
    assert store.commit(Batch(events=[event(f"{name}-committed")]), 20) == [STORED]
    store.close()


def test_a_store_made_before_a_fork_writes_in_every_child(store: Store, store_url: str) -> None:
    """gunicorn --preload makes the app, and so the store, in its master: each worker is
    a fork, where the master's writer thread does not exist. Without a writer of its
    own, every batch a worker submitted (all of an ASGI app's) timed out into a 503.
    (A memory store is each process's own: the children write, into their copies.)"""
    fork = multiprocessing.get_context("fork")
    workers = [fork.Process(target=_write_in_a_fork, args=(store, f"w{n}")) for n in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert store.submit(Batch(events=[event("master")])).result(60) == [STORED]
    from_children = ["w1-committed", "w1-submitted", "w2-committed", "w2-submitted"]
    shared = not store_url.startswith("memory://")
    assert sorted(e.message_id for e in store.events()) == [
        "master", *(from_children if shared else [])
    ]  # fmt: skip


def test_one_store_failing_after_a_fork_costs_the_others_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import weakref

    from fp_collect.store import base

    class Failing:
        def _after_fork(self) -> None:
            raise RuntimeError("cannot start a thread")

    class Restarted:
        restarted = False

        def _after_fork(self) -> None:
            self.restarted = True

    # Only these two: this process's real stores must not be restarted here.
    monkeypatch.setattr(base, "_FORK_AWARE", weakref.WeakSet())
    failing, restarted = Failing(), Restarted()
    base.restart_after_fork(failing)
    base.restart_after_fork(restarted)
    base._after_fork_in_child()  # what os.register_at_fork runs in a child
    assert restarted.restarted
