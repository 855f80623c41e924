"""What only the Redis store promises: the stream layout consumers rely on, trimming,
exactness across writers and processes, and behaviour while Redis is away."""

from __future__ import annotations

import http.client
import json
import multiprocessing
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fp_collect.errors import ConfigError, StoreUnavailable
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
    open_store,
)
from fp_collect.store.base import Identity, IdentityOp, SessionOp
from fp_collect.store.memory import MemoryStore
from fp_collect.store.redis_streams import RedisStore

from .conftest import redis_prefix
from .groups import (
    THREAD_IDS,
    assert_stored_as_memory,
    held_writer,
    offered_ids_of_batch,
    race_on_a_few_visitors,
    random_events,
    stored_by_threads,
    writers_of_lone_commits,
)

TIMEOUT = 60  # only guards against a hang; nothing here asserts on time
HANG = 15.0  # "did not hang": far above the 0.5 s socket timeouts the outage tests use

pytestmark = pytest.mark.timeout(120)

ANON = Identity("anonymous_id", "a-1")
USER = Identity("user_id", "u-1")
EMAIL = Identity("email", "ann@example.com")


def event(
    message_id: str,
    *,
    source_id: str = "src",
    payload: object = None,
    claims: tuple[Claim, ...] = (),
    identity: IdentityOp | None = None,
    session: SessionOp | None = None,
    warnings: tuple[str, ...] = (),
) -> EventRecord:
    return EventRecord(
        source_id=source_id,
        message_id=message_id,
        type="track",
        name="Order Completed",
        user_id="u1",
        anonymous_id=None,
        timestamp="2024-05-01T11:59:59.500Z",
        received_at="2024-05-01T12:00:00.000Z",
        payload=f'{{"messageId":"{message_id}","text":"héllo ✓"}}' if payload is None else payload,  # type: ignore[arg-type]
        claims=claims,
        identity=identity,
        session=session,
        warnings=warnings,
    )


def visitor(*identities: Identity, **fields: Any) -> IdentityOp:
    return IdentityOp(**{"scope": "ws", "at": 100.0, "identities": identities, **fields})


def stored_ids(store: Store, query: Query = Query()) -> list[str]:
    return [row.message_id for row in store.events(query)]


@pytest.fixture
def url(redis_url: str) -> Iterator[str]:
    with redis_prefix(redis_url) as prefixed:
        yield prefixed


# -- opening --------------------------------------------------------------------------


def test_open_store_reads_the_options_from_the_url(redis_url: str) -> None:
    options = {"maxlen": "10", "socket_timeout": "1.5", "client_name": "fp-t"}
    with redis_prefix(redis_url, **options) as url, open_store(url) as store:
        assert isinstance(store, RedisStore)
        assert store.prefix.startswith("fp-test-")
        kwargs = store.client.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == 1.5
        assert kwargs["socket_connect_timeout"] == 2.0  # our default
        assert kwargs["client_name"] == "fp-t"
        assert kwargs["decode_responses"] is True
        assert store.commit(Batch(events=[event("m1")])) == [STORED]
        assert store.client.client_getname() == "fp-t"


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("maxlen=0", "maxlen"),
        ("maxlen=ten", "maxlen"),
        ("claim_grace=-1", "claim_grace"),
        ("claim_grace=nan", "claim_grace"),
        ("prefix=a&prefix=b", "'prefix' twice"),
        ("socket_timeout=soon", "socket_timeout"),
        ("socket_timout=1", "socket_timout"),
    ],
)
def test_bad_options_are_refused_at_start_up(query: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as raised:
        open_store(f"redis://:secret@127.0.0.1:1/0?{query}")
    assert "secret" not in str(raised.value)


def test_a_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'fp-collect\[redis\]'"):
        open_store("redis://127.0.0.1:6379/0")


def test_an_unknown_scheme_lists_redis() -> None:
    with pytest.raises(ConfigError, match="redis://"):
        open_store("mongodb://127.0.0.1/events")


def test_opening_needs_no_server_and_commits_fail_while_it_is_down() -> None:
    # Port 1 refuses connections: the app still starts, and requests get a 503.
    with open_store("redis://127.0.0.1:1/0?prefix=fp-test-down:") as store:
        with pytest.raises(StoreUnavailable):
            store.submit(Batch(events=[event("m1")])).result(HANG)
        with pytest.raises(StoreUnavailable):
            list(store.events())


# -- the stream layout ----------------------------------------------------------------


def test_the_stream_layout_is_readable_by_a_consumer_group(url: str) -> None:
    with RedisStore(url) as store:
        first = event("m1", source_id="web")
        flagged = event(
            "m2",
            source_id="web",
            identity=visitor(ANON, new_profile_id="PR1"),
            session=SessionOp(at=100.0, timeout=1800.0, new_session_id="SE1"),
            warnings=("event name is not Title Case",),
        )
        other = event("m1", source_id="app")
        outcomes = store.commit(Batch(events=[first, first, flagged, other]))
        assert outcomes == [STORED, DUPLICATE, Outcome(True, None, "PR1", "SE1"), STORED]
        client, prefix = store.client, store.prefix
        stream = prefix + "events:web"
        client.xgroup_create(stream, "warehouse", id="0")
        read = client.xreadgroup("warehouse", "c1", {stream: ">"}, count=100)
        assert isinstance(read, list)  # RESP2: [[stream, entries]]
        [(name, entries)] = read
        assert name == stream
        assert client.xreadgroup("warehouse", "c2", {stream: ">"}, count=100) == []
        rows = list(store.events(Query(source_id="web")))
        # Each stored event once, in order; the entry ID is the event's id.
        assert [entry_id for entry_id, _ in entries] == [f"{row.id}-0" for row in rows]
        common = {
            "message_id": "m1",
            "type": "track",
            "name": "Order Completed",
            "user_id": "u1",
            "timestamp": "2024-05-01T11:59:59.500Z",
            "received_at": "2024-05-01T12:00:00.000Z",
            "source_id": "web",
            "payload": first.payload,
        }
        assert entries[0][1] == common
        assert entries[1][1] == {
            **common,
            "message_id": "m2",
            "payload": flagged.payload,
            "profile_id": "PR1",
            "session_id": "SE1",
            "warnings": '["event name is not Title Case"]',
        }
        assert client.hget(prefix + "messages:web", "m1") == str(rows[0].id)
        assert client.smembers(prefix + "sources") == {"web", "app"}
        # Ids grow across sources: one counter serves every stream.
        assert [row.id for row in store.events()] == sorted(row.id for row in store.events())
        rejections = client.xrange(prefix + "rejections")
        assert rejections is not None
        [rejection] = rejections
        assert rejection[1] == {
            "source_id": "web",
            "reason": "duplicate_message_id",
            "message": "not stored: duplicate_message_id",
            "received_at": "2024-05-01T12:00:00.000Z",
            "endpoint": "",
            "message_id": "m1",
            "payload": first.payload,
        }


def test_streams_are_not_trimmed_by_default(url: str) -> None:
    with RedisStore(url) as store:
        for n in range(0, 1000, 100):
            store.commit(Batch(events=[event(f"m{i}") for i in range(n, n + 100)]))
        assert store.client.xlen(store.prefix + "events:src") == 1000
        assert len(stored_ids(store)) == 1000


def test_maxlen_trims_each_stream_approximately_and_dedup_remembers(redis_url: str) -> None:
    with redis_prefix(redis_url, maxlen="100") as url, RedisStore(url) as store:
        for n in range(0, 1000, 100):
            store.commit(Batch(events=[event(f"m{i}") for i in range(n, n + 100)]))
            store.commit(Batch(rejections=[RejectionRecord("src", "r", "m", "t", "/", "{}")]))
        length = store.client.xlen(store.prefix + "events:src")
        assert 100 <= length < 1000  # "~": whole nodes go, so a little more may stay
        kept = stored_ids(store)
        assert kept == [f"m{i}" for i in range(1000 - length, 1000)]  # the newest
        assert store.client.xlen(store.prefix + "rejections") == 10  # under the bound
        assert store.commit(Batch(events=[event("m0")])) == [DUPLICATE]


def test_windowed_claims_expire_in_redis_and_forever_claims_do_not(redis_url: str) -> None:
    with redis_prefix(redis_url, claim_grace="5") as url, RedisStore(url) as store:
        opened = Claim("email_open", "u1:e1", at=100.0, until=160.0)
        ordered = Claim("order_id", "o-1", at=100.0)
        batch = Batch(events=[event("m1", claims=(opened,)), event("m2", claims=(ordered,))])
        assert store.commit(batch) == [STORED, STORED]
        window = store.prefix + 'claim:["src","email_open","u1:e1"]'
        forever = store.prefix + 'claim:["src","order_id","o-1"]'
        assert store.client.get(window) == "160.0"
        assert 0 < store.client.pttl(window) <= 65_000  # the 60 s window + 5 s of grace
        assert (store.client.get(forever), store.client.pttl(forever)) == ("", -1)


# -- exactness ------------------------------------------------------------------------


@pytest.mark.parametrize("committing", ["none", "half"])
def test_threads_store_each_message_id_once(url: str, committing: str) -> None:
    """Eight threads write the same 200 message ids; with ``half``, every other thread
    calls commit(), written in its own thread when nobody else is writing."""
    with RedisStore(url) as store:
        assert stored_by_threads(store, event, committing, TIMEOUT) == Counter(THREAD_IDS)
        assert sorted(stored_ids(store)) == sorted(THREAD_IDS)
        assert len(list(store.rejections())) == 7 * 200


def test_a_lone_commit_is_written_in_the_calling_thread(url: str) -> None:
    """Flask under a sync worker: no hand-over to the writer thread and back."""
    with RedisStore(url) as store:
        writers = writers_of_lone_commits(store, event, TIMEOUT)
    assert writers == [threading.current_thread().name] * 2


def test_a_commit_with_less_time_than_the_socket_timeouts_is_written_by_the_writer(
    redis_url: str,
) -> None:
    """redis-py cannot cut a command short, so a caller whose timeout is shorter than
    the client's socket timeouts (here 2 + 3 s) does not write itself: it would wait for
    them on a stalled Redis, past the moment it must be answered 503."""
    with redis_prefix(redis_url) as url, RedisStore(url) as store:
        assert writers_of_lone_commits(store, event, 4.0) == ["fp-collect-redis"] * 2
    with redis_prefix(redis_url) as url, RedisStore(url) as store:
        in_time = writers_of_lone_commits(store, event, 5.0)
    assert in_time == [threading.current_thread().name] * 2


def interleave(store: RedisStore, monkeypatch: pytest.MonkeyPatch, meanwhile: Any) -> None:
    """Run ``meanwhile()`` once, after ``store`` planned its next batch from what it read
    and before that batch's script runs: the race two writers can always lose."""
    original = store._commit
    pending: list[Callable[[], object]] = [meanwhile]

    def commit(*args: Any, **kwargs: Any) -> Any:
        while pending:
            pending.pop()()
        return original(*args, **kwargs)

    monkeypatch.setattr(store, "_commit", commit)


def test_another_writer_storing_the_message_id_first_makes_it_a_duplicate(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RedisStore(url) as mine, RedisStore(url) as theirs:
        interleave(mine, monkeypatch, lambda: theirs.commit(Batch(events=[event("m1")])))
        assert mine.commit(Batch(events=[event("m1"), event("m2")])) == [DUPLICATE, STORED]
        assert mine.conflicts == 1
        assert stored_ids(mine) == ["m1", "m2"]


def test_another_writer_taking_the_claim_first_refuses_the_event(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    order = Claim("order_id", "o-1", at=1.0)
    free = Claim("order_id", "o-2", at=1.0)
    with RedisStore(url) as mine, RedisStore(url) as theirs:
        interleave(
            mine, monkeypatch, lambda: theirs.commit(Batch(events=[event("x", claims=(order,))]))
        )
        refused = mine.commit(Batch(events=[event("m1", claims=(free, order))]))
        assert refused == [Outcome(False, "order_id")]
        # The refused event took none of its claims: o-2 is still free.
        assert mine.commit(Batch(events=[event("m2", claims=(free,))])) == [STORED]
        assert stored_ids(mine) == ["x", "m2"]


def test_two_writers_creating_one_visitor_end_on_one_profile(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RedisStore(url) as mine, RedisStore(url) as theirs:
        first = event("t1", identity=visitor(ANON, new_profile_id="PR-theirs"))
        interleave(mine, monkeypatch, lambda: theirs.commit(Batch(events=[first])))
        [outcome] = mine.commit(Batch(events=[event("m1", identity=visitor(ANON, USER))]))
        assert (outcome.stored, outcome.profile_id) == (True, "PR-theirs")
        assert mine.conflicts == 1
        profile = mine.profile("PR-theirs")
        assert profile is not None and set(profile.identities) == {ANON, USER}
        assert {row.profile_id for row in mine.events()} == {"PR-theirs"}


def test_a_session_touched_by_another_writer_is_read_again(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def at(t: float, message_id: str) -> EventRecord:
        op = visitor(ANON, new_profile_id="PR1", at=t)
        return event(message_id, identity=op, session=SessionOp(t, 1800.0, f"SE{t:g}"))

    with RedisStore(url) as mine, RedisStore(url) as theirs:
        assert mine.commit(Batch(events=[at(0, "m0")]))[0].session_id == "SE0"
        # Planned alone, 2000 s after SE0's last event, m1 would start a session; but
        # meanwhile the other writer's event at 1000 kept SE0 alive.
        interleave(mine, monkeypatch, lambda: theirs.commit(Batch(events=[at(1000, "t1")])))
        assert mine.commit(Batch(events=[at(2000, "m1")]))[0].session_id == "SE0"
        assert mine.conflicts == 1


def test_a_merge_sees_identities_another_writer_attached_meanwhile(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RedisStore(url) as mine, RedisStore(url) as theirs:
        mine.commit(Batch(events=[event("m1", identity=visitor(ANON, new_profile_id="PR-a"))]))
        mine.commit(
            Batch(events=[event("m2", identity=visitor(USER, new_profile_id="PR-u", at=200.0))])
        )
        # Meanwhile the profile about to be merged away gains an identity: the merge
        # must move it too.
        email = event("t1", identity=visitor(USER, EMAIL))
        interleave(mine, monkeypatch, lambda: theirs.commit(Batch(events=[email])))
        merged = mine.commit(Batch(events=[event("m3", identity=visitor(USER, ANON, merge=True))]))
        assert merged[0].profile_id == "PR-a"
        assert mine.conflicts == 1
        profile = mine.profile("PR-u")
        assert profile is not None and profile.id == "PR-a"
        assert set(profile.identities) == {ANON, USER, EMAIL}
        # Every identity now leads to the survivor.
        later = mine.commit(Batch(events=[event("m4", identity=visitor(EMAIL, create=False))]))
        assert later[0].profile_id == "PR-a"


def test_a_failing_batch_fails_alone_and_takes_nothing(url: str) -> None:
    claim = Claim("order_id", "o-1", at=1.0)
    with RedisStore(url) as store:
        bad = store.submit(
            Batch(events=[event("ok-too", claims=(claim,)), event("bad", payload=object())])
        )
        good = store.submit(Batch(events=[event("good")]))
        with pytest.raises(StoreUnavailable, match="payload must be text"):
            bad.result(TIMEOUT)
        assert good.result(TIMEOUT) == [STORED]
        assert stored_ids(store) == ["good"]
        assert store.commit(Batch(events=[event("m3", claims=(claim,))])) == [STORED]


def test_a_batch_cancelled_before_the_writer_takes_it_is_not_written(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RedisStore(url) as store:
        busy, release = threading.Event(), threading.Event()

        def hold_the_writer() -> None:
            busy.set()
            release.wait(TIMEOUT)

        interleave(store, monkeypatch, hold_the_writer)
        first = store.submit(Batch(events=[event("m1")]))
        assert busy.wait(TIMEOUT)
        second = store.submit(Batch(events=[event("m2")]))
        assert second.cancel()
        release.set()
        assert first.result(TIMEOUT) == [STORED]
        assert store.commit(Batch(events=[event("m3")]), TIMEOUT) == [STORED]
        assert stored_ids(store) == ["m1", "m3"]


def test_a_lost_answer_fails_the_future_and_the_retry_is_a_duplicate(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RedisStore(url) as store:
        real = store.client.pipeline

        def pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = real(*args, **kwargs)
            execute = pipe.execute

            def answer_lost(raise_on_error: bool = True) -> Any:
                replies = execute(raise_on_error=raise_on_error)
                if not raise_on_error:  # the scripts' pipeline: they ran, the answer is lost
                    raise redis.ConnectionError("connection lost while reading the answer")
                return replies

            pipe.execute = answer_lost  # type: ignore[method-assign]  # this pipeline only
            return pipe

        monkeypatch.setattr(store.client, "pipeline", pipeline)
        with pytest.raises(StoreUnavailable, match="connection lost"):
            store.submit(Batch(events=[event("m1")])).result(TIMEOUT)
        monkeypatch.undo()
        # The client retries: the event was stored, once.
        assert store.commit(Batch(events=[event("m1")]), TIMEOUT) == [DUPLICATE]
        assert stored_ids(store) == ["m1"]


def test_close_drains_then_submit_raises(url: str) -> None:
    store = RedisStore(url)
    futures = [store.submit(Batch(events=[event(f"m{i}")])) for i in range(50)]
    store.close()
    assert all(future.result(0) == [STORED] for future in futures)
    with pytest.raises(StoreUnavailable, match="closed"):
        store.submit(Batch())
    store.close()
    assert len(stored_ids(store)) == 50  # still readable


@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(random_events(), min_size=1, max_size=4))
def test_a_group_of_batches_decides_like_the_memory_store_one_by_one(
    redis_url: str, batches: list[list[EventRecord]]
) -> None:
    """The batches of one group are planned on top of each other's writes (before any is
    in Redis): the result must be what committing them one at a time gives."""
    batches = [offered_ids_of_batch(number, events) for number, events in enumerate(batches)]
    memory = MemoryStore()
    expected = [memory.commit(Batch(events=list(events))) for events in batches]
    with redis_prefix(redis_url) as url, RedisStore(url) as store:
        with held_writer(store):
            futures = [store.submit(Batch(events=list(events))) for events in batches]
        assert [future.result(TIMEOUT) for future in futures] == expected
        assert store.conflicts == 0
        assert_stored_as_memory(store, memory, expected)


def test_racing_writers_keep_every_index_consistent(url: str) -> None:
    """Three stores (three writers) in six threads, on a handful of visitors: merges,
    sessions and repeated messageIds all conflicting. Whatever the interleaving, each
    messageId is stored once and the indexes agree with each other."""
    stores = [RedisStore(url) for _ in range(3)]
    try:
        stored = race_on_a_few_visitors(stores, rounds=40)
    finally:
        for store in stores:
            store.close()
    with RedisStore(url) as store:
        assert Counter(stored_ids(store)) == stored == Counter(set(stored))
        for row in store.events():
            assert row.profile_id is not None and store.profile(row.profile_id) is not None
        assert_indexes_agree(store.client, store.prefix)


def text(reply: bytes | str | None) -> str:
    """A reply of the store's client, which decodes responses: a string."""
    assert isinstance(reply, str), reply
    return reply


def assert_indexes_agree(client: redis.Redis, prefix: str) -> None:
    """Identity owners, profiles' identity sets, sessions and profiles' session sets all
    say the same thing, and only live (unmerged) profiles own anything."""

    def live(profile_id: str) -> bool:
        return bool(client.hexists(prefix + "profile:" + profile_id, "created_at")) and not (
            client.hexists(prefix + "profile:" + profile_id, "merged_into")
        )

    def keys(kind: str) -> Iterator[tuple[str, str]]:
        for key in client.scan_iter(match=f"{prefix}{kind}:*", count=1000):
            yield key, key[len(prefix) + len(kind) + 1 :]

    for key, scope in keys("identities"):
        for name, owner in client.hgetall(key).items():
            kind, _, value = text(name).partition(":")
            member = json.dumps([scope, kind, value], separators=(",", ":"))
            owner = text(owner)
            assert live(owner) and client.sismember(f"{prefix}profile-identities:{owner}", member)
    for key, profile_id in keys("profile-identities"):
        for member in map(text, client.smembers(key)):
            scope, kind, value = json.loads(member)
            assert client.hget(f"{prefix}identities:{scope}", f"{kind}:{value}") == profile_id
    for key, profile_id in keys("profile-sessions"):
        assert live(profile_id)
        for entry in client.zrange(key, 0, -1, withscores=True):
            assert isinstance(entry, tuple)  # withscores: (member, score) pairs
            session_id, score = text(entry[0]), entry[1]
            found = client.hgetall(f"{prefix}session:{session_id}")
            assert (found["profile_id"], float(found["last_seen"])) == (profile_id, score)
    for key, session_id in keys("session"):
        owner = text(client.hget(key, "profile_id"))
        assert client.zscore(f"{prefix}profile-sessions:{owner}", session_id) is not None


# -- two processes --------------------------------------------------------------------

ROUNDS = 40


def _mixed_batch(worker: int, n: int) -> Batch:
    """What both workers send at once: the same messageId, the same orderId, the same
    windowed email open, and the first event of the same visitor."""
    visit = visitor(Identity("anonymous_id", f"a-{n}"), new_profile_id=f"PR-{worker}-{n}")
    return Batch(
        events=[
            event(f"m{n}"),
            event(f"w{worker}-o{n}", claims=(Claim("order_id", f"o{n}", at=1.0),)),
            event(
                f"w{worker}-e{n}",
                claims=(Claim("email_open", f"u1:e{n}", at=1000.0, until=1060.0),),
            ),
            event(
                f"w{worker}-v{n}",
                identity=visit,
                session=SessionOp(at=100.0, timeout=1800.0, new_session_id=f"SE-{worker}-{n}"),
            ),
        ]
    )


def _worker(
    url: str, worker: int, barrier: Barrier, results: Queue[tuple[list[Outcome], int]]
) -> None:
    with RedisStore(url) as store:
        outcomes: list[Outcome] = []
        for n in range(ROUNDS):
            # In step, so that the two really race for each round's keys.
            barrier.wait(TIMEOUT)
            outcomes += store.commit(_mixed_batch(worker, n), TIMEOUT)
        results.put((outcomes, store.conflicts))


def test_two_processes_share_one_prefix(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Spawned children unpickle _worker by module name; under --import-mode=importlib
    # that name is not importable unless its root is on sys.path (children inherit it).
    monkeypatch.syspath_prepend(Path(__file__).parents[__name__.count(".")])
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results: Queue[tuple[list[Outcome], int]] = ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(url, n, barrier, results)) for n in range(2)]
    for process in workers:
        process.start()
    # Not asserted, as it depends on scheduling; in practice about half the rounds
    # conflict, and the outcomes below are exact either way.
    outcomes = [results.get(timeout=TIMEOUT)[0] for _ in workers]
    for process in workers:
        process.join(TIMEOUT)
        assert process.exitcode == 0
    plain = Counter(o for worker in outcomes for i, o in enumerate(worker) if i % 4 != 3)
    assert plain == {
        STORED: 3 * ROUNDS,
        DUPLICATE: ROUNDS,
        Outcome(False, "order_id"): ROUNDS,
        Outcome(False, "email_open"): ROUNDS,
    }
    with RedisStore(url) as store:
        for n in range(ROUNDS):
            # Both first events of visitor a-n: stored, on one profile, in one session.
            first, second = (worker[4 * n + 3] for worker in outcomes)
            assert first.stored and second.stored
            assert (first.profile_id, first.session_id) == (second.profile_id, second.session_id)
            winner = first.profile_id
            assert winner in (f"PR-0-{n}", f"PR-1-{n}")
            loser = f"PR-1-{n}" if winner == f"PR-0-{n}" else f"PR-0-{n}"
            assert store.profile(loser) is None
            profile = store.profile(winner)
            assert profile is not None
            assert profile.identities == (Identity("anonymous_id", f"a-{n}"),)
        stored = stored_ids(store)
        assert len(stored) == len(set(stored)) == 5 * ROUNDS
        assert sorted(m for m in stored if m.startswith("m")) == sorted(
            f"m{n}" for n in range(ROUNDS)
        )
        # Each orderId and each email open went to exactly one of the workers.
        claimed = Counter(m.partition("-")[2] for m in stored if m.startswith("w"))
        expected = [f"{kind}{n}" for kind in "oev" for n in range(ROUNDS)]
        assert claimed == Counter(
            {**dict.fromkeys(expected, 1), **{f"v{n}": 2 for n in range(ROUNDS)}}
        )


# -- outages --------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Load:
    """A few threads committing small batches in a loop, as request handlers would, and
    what became of each batch."""

    def __init__(self, store: Store, threads: int = 4) -> None:
        self.store = store
        self.lock = threading.Lock()
        self.ok: list[list[str]] = []
        self.failed: list[list[str]] = []
        self.slowest_failure = 0.0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, args=(t,)) for t in range(threads)]
        for thread in self._threads:
            thread.start()

    def _send(self, thread: int) -> None:
        for n in range(100_000):
            if self._stop.is_set():
                return
            ids = [f"t{thread}-{n}-{k}" for k in range(3)]
            started = time.monotonic()
            try:
                batch = Batch(events=[event(i) for i in ids])
                if thread % 2:  # the WSGI path: written here when nobody else is writing
                    outcomes = self.store.commit(batch, HANG)
                else:
                    outcomes = self.store.submit(batch).result(HANG)
            except StoreUnavailable:
                with self.lock:
                    self.failed.append(ids)
                    self.slowest_failure = max(self.slowest_failure, time.monotonic() - started)
                time.sleep(0.005)  # a client backing off
                continue
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                with self.lock:
                    self.errors.append(exc)
                return
            if outcomes != [STORED] * 3:
                with self.lock:
                    self.errors.append(AssertionError(f"{ids}: {outcomes}"))
            with self.lock:
                self.ok.append(ids)

    def count(self, which: str) -> int:
        with self.lock:
            return len(self.ok if which == "ok" else self.failed)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(TIMEOUT)
        assert not any(thread.is_alive() for thread in self._threads), "a sender hung"


def proxied(redis_url: str, tcp_proxy: Any) -> Any:
    parts = urlsplit(redis_url)
    return tcp_proxy(parts.hostname or "127.0.0.1", parts.port or 6379)


@pytest.mark.parametrize("outage", ["cut", "stall"])
def test_commits_fail_within_the_timeout_during_an_outage_and_resume_after(
    redis_url: str, tcp_proxy: Any, outage: str
) -> None:
    proxy = proxied(redis_url, tcp_proxy)
    timeouts = {"socket_timeout": "0.5", "socket_connect_timeout": "0.5"}
    with redis_prefix(redis_url, **timeouts) as direct, RedisStore(proxy.url(direct)) as store:
        load = Load(store)
        try:
            wait_until(lambda: load.count("ok") >= 30, "commits before the outage")
            getattr(proxy, outage)()
            failed_before = load.count("failed")
            wait_until(lambda: load.count("failed") >= failed_before + 8, "failed commits")
            proxy.restore()
            resumed_from = load.count("ok")
            wait_until(lambda: load.count("ok") >= resumed_from + 30, "commits after restore")
        finally:
            proxy.restore()
            load.stop()
        assert load.errors == []
        assert load.slowest_failure < HANG
        # Every batch answered with outcomes is stored exactly once.
        with RedisStore(direct) as reader:
            stored = Counter(stored_ids(reader))
        assert all(stored[i] == 1 for ids in load.ok for i in ids)
        # A failed batch may have been stored anyway (its answer lost): the client's
        # retry finds it by messageId. After the retries, every event is there once.
        for ids in load.failed:
            outcomes = store.commit(Batch(events=[event(i) for i in ids]), TIMEOUT)
            assert set(outcomes) <= {STORED, DUPLICATE}
        every = [i for ids in load.ok + load.failed for i in ids]
        with RedisStore(direct) as reader:
            assert Counter(stored_ids(reader)) == Counter(every)


# -- the whole collector ---------------------------------------------------------------


@contextmanager
def serve(app: Any) -> Iterator[int]:
    """``app`` under uvicorn on 127.0.0.1 (as tests/integration/conftest.py does)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="on", ws="none", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), "uvicorn", 10)
        assert server.started
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


def request(port: int, method: str, path: str, body: object = None) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG)
    try:
        headers = {"content-type": "application/json", "authorization": "Basic d2s6"}  # "wk:"
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def test_a_collector_answers_503_while_redis_is_cut_and_200_after(
    redis_url: str, tcp_proxy: Any
) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from fp_collect import Collector, Source
    from fp_collect.adapters.asgi import CollectorMiddleware

    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("home")

    def track(message_id: str) -> dict[str, str]:
        return {"userId": "u-1", "event": "Signed Up", "messageId": message_id}

    proxy = proxied(redis_url, tcp_proxy)
    timeouts = {"socket_timeout": "0.5", "socket_connect_timeout": "0.5"}
    with redis_prefix(redis_url, **timeouts) as direct:
        commit_timeout = 3.0
        collector = Collector(
            sources=[Source(write_key="wk", id="web")],
            storage=proxy.url(direct),
            prefix="/collect",
            commit_timeout=commit_timeout,
        )
        app = Starlette(routes=[Route("/", home)])
        app.add_middleware(CollectorMiddleware, collector=collector)
        with serve(app) as port:
            assert request(port, "POST", "/collect/v1/track", track("before"))[0] == 200
            proxy.cut()
            try:
                started = time.monotonic()
                status, headers = request(port, "POST", "/collect/v1/track", track("during"))
                assert (status, headers["retry-after"]) == (503, "5")
                assert time.monotonic() - started < commit_timeout + 2  # did not hang
                assert request(port, "GET", "/")[0] == 200  # the site itself is fine
            finally:
                proxy.restore()
            # The client retries "during"; new events go through as well.
            for message_id in ("during", "after"):
                assert request(port, "POST", "/collect/v1/track", track(message_id))[0] == 200
        with open_store(direct) as store:
            assert [row.message_id for row in store.events()] == ["before", "during", "after"]
