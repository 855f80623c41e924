"""Profiles, identities and sessions: the same behaviour on every backend."""

from __future__ import annotations

import json
import threading

from fp_collect.store import Batch, EventRecord, Outcome, Query, Store
from fp_collect.store.base import Identity, IdentityOp, SessionOp
from fp_collect.store.identity import MAX_PROFILE_TRAITS

USER = Identity("user_id", "u-1")
ANON = Identity("anonymous_id", "a-1")
EMAIL = Identity("email", "ann@example.com")


_counter = iter(range(10**9))


def record(
    op: IdentityOp, session: SessionOp | None = None, message_id: str | None = None
) -> EventRecord:
    message_id = message_id or f"m-{next(_counter)}"
    return EventRecord(
        source_id="src",
        message_id=message_id,
        type="track",
        name="Page Viewed",
        user_id=None,
        anonymous_id=None,
        timestamp="2024-05-01T12:00:00.000Z",
        received_at="2024-05-01T12:00:00.000Z",
        payload=f'{{"messageId":"{message_id}"}}',
        identity=op,
        session=session,
    )


def op(*identities: Identity, **fields: object) -> IdentityOp:
    values: dict[str, object] = {"scope": "ws", "at": 100.0, "identities": identities}
    values.update(fields)
    return IdentityOp(**values)  # type: ignore[arg-type]


def commit_one(store: Store, event: EventRecord) -> Outcome:
    (outcome,) = store.commit(Batch(events=[event]))
    return outcome


def test_a_new_identity_creates_one_profile_with_the_offered_id(store: Store) -> None:
    outcome = commit_one(store, record(op(ANON, new_profile_id="PR" + "A" * 30)))
    assert outcome.stored and outcome.profile_id == "PR" + "A" * 30
    again = commit_one(store, record(op(ANON, new_profile_id="PR" + "B" * 30)))
    assert again.profile_id == outcome.profile_id
    profile = store.profile(outcome.profile_id)
    assert profile is not None and profile.identities == (ANON,) and profile.scope == "ws"
    (stored, _) = store.events()
    assert stored.profile_id == outcome.profile_id


def test_identities_are_scoped_by_workspace(store: Store) -> None:
    first = commit_one(store, record(op(ANON, scope="ws-1", new_profile_id="PR1")))
    second = commit_one(store, record(op(ANON, scope="ws-2", new_profile_id="PR2")))
    assert (first.profile_id, second.profile_id) == ("PR1", "PR2")


def test_a_new_identity_is_attached_to_the_profile_of_a_known_one(store: Store) -> None:
    anonymous = commit_one(store, record(op(ANON, new_profile_id="PR1")))
    both = commit_one(store, record(op(USER, ANON, new_profile_id="PR2")))
    assert both.profile_id == anonymous.profile_id == "PR1"
    profile = store.profile("PR1")
    assert profile is not None and set(profile.identities) == {USER, ANON}


def test_merge_joins_two_profiles_into_the_oldest(store: Store) -> None:
    commit_one(store, record(op(ANON, new_profile_id="PR-old", at=1.0)))
    commit_one(store, record(op(USER, new_profile_id="PR-new", at=2.0, traits={"plan": "a"})))
    merged = commit_one(
        store, record(op(USER, ANON, merge=True, traits={"name": "Ann"}, new_profile_id="PRx"))
    )
    assert merged.profile_id == "PR-old"
    survivor = store.profile("PR-new")  # followed through the merge
    assert survivor is not None and survivor.id == "PR-old"
    assert set(survivor.identities) == {USER, ANON}
    assert survivor.traits == {"plan": "a", "name": "Ann"}


def test_a_profiles_events_include_those_of_profiles_merged_into_it(store: Store) -> None:
    commit_one(store, record(op(ANON, new_profile_id="PR-a", at=1.0), message_id="e-a"))
    commit_one(store, record(op(USER, new_profile_id="PR-b", at=2.0), message_id="e-b"))
    commit_one(store, record(op(EMAIL, new_profile_id="PR-c", at=3.0), message_id="e-c"))
    commit_one(store, record(op(EMAIL, USER, merge=True), message_id="e-bc"))  # c into b
    commit_one(store, record(op(ANON, USER, merge=True), message_id="e-ab"))  # b into a
    everything = ["e-a", "e-b", "e-c", "e-bc", "e-ab"]
    for member in ("PR-a", "PR-b", "PR-c"):  # any member's id names the whole family
        assert [e.message_id for e in store.events(Query(profile_id=member))] == everything
    assert list(store.events(Query(profile_id="PR-unknown"))) == []
    commit_one(store, record(op(Identity("user_id", "other"), new_profile_id="PR-d")))
    assert len(list(store.events(Query(profile_id="PR-d")))) == 1


def test_without_merge_an_identity_is_never_stolen(store: Store) -> None:
    commit_one(store, record(op(ANON, new_profile_id="PR1")))
    commit_one(store, record(op(USER, new_profile_id="PR2")))
    outcome = commit_one(store, record(op(USER, ANON, new_profile_id="PR3")))
    assert outcome.profile_id == "PR2"
    profile = store.profile("PR1")
    assert profile is not None and profile.identities == (ANON,)


def test_lookups_find_but_are_not_attached(store: Store) -> None:
    commit_one(store, record(op(ANON, new_profile_id="PR1")))
    aliased = commit_one(
        store,
        record(op(USER, lookups=(Identity("user_id", "a-1"), ANON), merge=True,
                  new_profile_id="PR2")),
    )  # fmt: skip
    assert aliased.profile_id == "PR1"
    profile = store.profile("PR1")
    assert profile is not None and set(profile.identities) == {USER, ANON}


def test_an_unknown_user_is_refused_when_creation_is_not_allowed(store: Store) -> None:
    refused = commit_one(store, record(op(EMAIL, create=False), message_id="m-unknown"))
    assert refused == Outcome(False, "unknown_user")
    assert list(store.events()) == []
    assert [(r.reason, r.message_id) for r in store.rejections()] == [("unknown_user", "m-unknown")]
    commit_one(store, record(op(EMAIL, USER, new_profile_id="PR1")))
    known = commit_one(store, record(op(EMAIL, create=False)))
    assert known.stored and known.profile_id == "PR1"


def test_an_explicit_profile_id_is_used_and_created_when_unknown(store: Store) -> None:
    first = commit_one(store, record(op(profile_id="PR" + "9" * 30)))
    assert first.profile_id == "PR" + "9" * 30
    assert store.profile("PR" + "9" * 30) is not None
    assert commit_one(store, record(op(profile_id="PR-none", create=False))).reason == (
        "unknown_user"
    )


def test_a_duplicate_creates_no_profile(store: Store) -> None:
    commit_one(store, record(op(ANON, new_profile_id="PR1"), message_id="same"))
    duplicate = commit_one(store, record(op(USER, new_profile_id="PR2"), message_id="same"))
    assert duplicate.reason == "duplicate_message_id"
    assert store.profile("PR2") is None


def session(at: float, **fields: object) -> SessionOp:
    values: dict[str, object] = {"at": at, "timeout": 1800.0, "new_session_id": f"SE{at}"}
    values.update(fields)
    return SessionOp(**values)  # type: ignore[arg-type]


def test_sessions_split_exactly_at_the_inactivity_timeout(store: Store) -> None:
    ids = [
        commit_one(store, record(op(ANON, new_profile_id="PR1"), session(at))).session_id
        for at in (0.0, 1799.5, 3599.0, 5399.0, 5400.0)
    ]
    # Each gap is measured from the session's last event: 1799.5 joins, exactly 1800 does not.
    assert ids == ["SE0.0", "SE0.0", "SE0.0", "SE5399.0", "SE5399.0"]


def test_an_explicit_session_id_is_used_and_created_when_unknown(store: Store) -> None:
    named = commit_one(store, record(op(ANON, new_profile_id="PR1"), session(0.0, session_id="S")))
    assert named.session_id == "S"
    joined = commit_one(store, record(op(ANON, new_profile_id="PR1"), session(10.0)))
    assert joined.session_id == "S"


def test_concurrent_first_events_of_one_visitor_make_one_profile(store: Store) -> None:
    start = threading.Barrier(8)
    results: list[Outcome] = []
    lock = threading.Lock()

    def send(n: int) -> None:
        start.wait()
        outcome = commit_one(store, record(op(ANON, new_profile_id=f"PR-{n}")))
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 8
    assert len({outcome.profile_id for outcome in results}) == 1


def test_an_unknown_profile_id_falls_back_to_its_lookups_when_none_may_be_made(
    store: Store,
) -> None:
    """The user-event API's ``_id``: a profile id if a profile has it, else looked up."""
    known = commit_one(store, record(op(USER, new_profile_id="PR1")))
    found = commit_one(store, record(op(profile_id="u-1", lookups=(USER,), create=False)))
    assert found.profile_id == known.profile_id == "PR1"
    direct = commit_one(store, record(op(profile_id="PR1", lookups=(ANON,), create=False)))
    assert direct.profile_id == "PR1"
    nobody = commit_one(store, record(op(profile_id="nobody", lookups=(ANON,), create=False)))
    assert (nobody.stored, nobody.profile_id) == (False, None)
    assert store.profile("u-1") is None and store.profile("nobody") is None


def test_a_profile_id_of_another_workspace_is_as_if_none_were_given(store: Store) -> None:
    """Profile ids are public (answered to clients) and may be chosen by one: another
    workspace's profile is never joined, found or changed through its id."""
    theirs = commit_one(store, record(op(scope="ws-a", profile_id="PR-A")))
    assert theirs.profile_id == "PR-A"
    ours = commit_one(store, record(op(USER, scope="ws-b", new_profile_id="PR-B")))
    named = commit_one(
        store, record(op(scope="ws-b", profile_id="PR-A", create=False, lookups=(USER,)))
    )
    assert named.profile_id == ours.profile_id == "PR-B"
    alone = commit_one(store, record(op(scope="ws-b", profile_id="PR-A", create=False)))
    assert (alone.stored, alone.profile_id) == (False, None)
    created = commit_one(
        store, record(op(ANON, scope="ws-b", profile_id="PR-A", new_profile_id="PR-C"))
    )
    assert created.profile_id == "PR-C"
    profile = store.profile("PR-A")
    assert profile is not None and profile.scope == "ws-a" and profile.identities == ()


def test_a_profiles_traits_stop_growing_at_the_bound(store: Store) -> None:
    """Traits are merged until the profile's would take more than MAX_PROFILE_TRAITS
    characters: an identify that would pass the bound leaves them as they were (its
    event is still stored), while a smaller one still updates them. The same bound holds
    when two profiles merge: the survivor then keeps its own traits."""
    big = {"bio": "x" * (MAX_PROFILE_TRAITS - 100)}
    first = commit_one(store, record(op(USER, merge=True, traits=big, new_profile_id="PR-u")))
    assert first.profile_id == "PR-u"
    over = commit_one(store, record(op(USER, merge=True, traits={"more": "y" * 200})))
    assert over.stored
    small = commit_one(store, record(op(USER, merge=True, traits={"plan": "pro"})))
    assert small.stored
    profile = store.profile("PR-u")
    assert profile is not None and profile.traits == {**big, "plan": "pro"}
    assert len(json.dumps(profile.traits, separators=(",", ":"))) <= MAX_PROFILE_TRAITS

    # Another person with traits of their own; joining the two would pass the bound.
    commit_one(store, record(op(ANON, merge=True, traits={"name": "Ann" * 50},
                                new_profile_id="PR-a", at=50.0)))  # fmt: skip
    joined = commit_one(store, record(op(USER, ANON, merge=True)))
    assert joined.profile_id == "PR-a"  # the older profile survives
    survivor = store.profile("PR-u")
    assert survivor is not None and survivor.id == "PR-a"
    assert survivor.traits == {"name": "Ann" * 50}
    assert len(list(store.events())) == 5
