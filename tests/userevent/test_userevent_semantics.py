"""What a user event does: who it is for, and what update, login, generic, confirmation
and email_open store (seed 003). Through ``Collector.handle``, on memory and SQLite."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fp_collect import Collector, Request, Source, Workspace

KEY = "ue-key"
OTHER_KEY = "other-key"
CREATED = "Event was created for the specified user"
PROFILE_ID = re.compile(r"PR[0-9A-F]{30}")
ANN = {"email": "ann@example.com"}


def results(answer: Any) -> dict[str, Any]:
    assert answer.status == 200, answer.body
    body = answer.json
    assert list(body) == ["results"]
    assert body["results"]["message"] == "Event created"
    found: dict[str, Any] = body["results"]
    return found


def error_code(answer: Any) -> str:
    assert answer.status == 400, answer.body
    (error,) = answer.json["errors"]
    code: str = error["code"]
    return code


# -- who the event is for ----------------------------------------------------------


def test_a_user_identified_through_segment_is_found_by_email_user_id_or_profile_id(
    harness: Any,
) -> None:
    harness.identify("u-ann", anonymousId="anon-ann", traits={"email": "Ann@Example.com"})
    (identify,) = harness.events()
    profile_id = identify.profile_id
    assert PROFILE_ID.fullmatch(profile_id)
    for user in (
        {"email": "ann@example.com"},
        {"email": "ANN@EXAMPLE.COM"},  # emails compare case-insensitively
        {"email": " Ann@Example.com "},
        {"_id": "u-ann"},
        {"_id": "anon-ann"},
        {"_id": profile_id},
    ):
        answer = harness.event(user, {"update": {"seen": True}})
        identifier = "email" if "email" in user else "_id"
        assert results(answer) == {
            "message": "Event created",
            identifier: CREATED,
            "profile_id": profile_id,
        }, user
    assert {e.profile_id for e in harness.events()} == {profile_id}
    assert len(harness.events()) == 7


def test_a_profile_made_by_a_firstparty_event_is_found_by_its_profile_id(harness: Any) -> None:
    profile_id = harness.fp_track("Page Viewed")
    answer = harness.event({"_id": profile_id}, {"update": {"plan": "pro"}})
    assert results(answer)["profile_id"] == profile_id
    assert harness.profile(profile_id).traits == {"plan": "pro"}


@pytest.mark.parametrize(
    "given", ["PRKQ3N5TZ6M2ABCDEFGHJKMNPQRSTVWX", "visitor-42", "pr" + "0" * 30]
)
def test_a_profile_id_a_firstparty_client_chose_finds_its_profile(harness: Any, given: str) -> None:
    """The Firstparty API takes the client's ``profile_id`` as it is; ``_id`` finds that
    profile whatever its shape, not only the store's own ``PR`` + 30 hex digits."""
    assert harness.fp_track("Page Viewed", profile_id=given) == given
    answer = harness.event({"_id": given}, {"update": {"plan": "pro"}})
    assert results(answer)["profile_id"] == given
    assert harness.profile(given).traits == {"plan": "pro"}


def test_an_id_no_profile_has_is_looked_up_as_a_user_id(harness: Any) -> None:
    harness.track("Page Viewed", userId="visitor-7")
    (track,) = harness.events()
    answer = harness.event({"_id": "visitor-7"}, {"update": {"plan": "pro"}})
    assert results(answer)["profile_id"] == track.profile_id
    assert harness.store.profile("visitor-7") is None  # never made on the way


def test_a_firstparty_event_with_an_email_makes_the_email_known(harness: Any) -> None:
    profile_id = harness.fp_track("Form Completed", email="Bob@Example.com")
    answer = harness.event({"email": "bob@example.com"}, {"update": {"name": "Bob"}})
    assert results(answer)["profile_id"] == profile_id


def test_a_segment_track_with_only_an_anonymous_id_makes_a_known_user(harness: Any) -> None:
    harness.track("Page Viewed", anonymousId="anon-7")
    (track,) = harness.events()
    answer = harness.event({"_id": "anon-7"}, {"generic": {"event_name": "Video Played"}})
    assert results(answer)["profile_id"] == track.profile_id


@pytest.mark.parametrize(
    "user",
    [
        {"email": "ann@example.com"},
        {"_id": "u-ann"},
        {"_id": "PR" + "0" * 30},  # a profile id nobody has
        {"_id": "pr" + "0" * 30},
    ],
)
def test_nobody_is_created_by_an_event_for_an_unknown_user(harness: Any, user: Any) -> None:
    first = harness.event(user, {"login": {"email": "ann@example.com"}})
    assert error_code(first) == "unknown_user"
    # Not created on the way: a second event for the same user is refused too.
    again = harness.event(user, {"update": {"plan": "pro"}})
    assert error_code(again) == "unknown_user"
    assert harness.events() == []
    assert [r.reason for r in harness.rejections()] == ["unknown_user", "unknown_user"]
    assert harness.store.profile("PR" + "0" * 30) is None


def test_users_of_another_workspace_are_unknown(make_harness: Any) -> None:
    harness = make_harness(
        "core",
        "sqlite",
        # Lists, as Workspace's docstring shows: it makes a tuple of them.
        workspaces=[
            Workspace("a", sources=[Source(write_key=KEY, id="shop")]),
            Workspace("b", sources=[Source(write_key=OTHER_KEY, id="blog")]),
        ],
        sources=[],
    )
    harness.identify("u-ann", traits=ANN)
    assert results(harness.event(ANN, {"update": {"x": 1}}))
    assert error_code(harness.event(ANN, {"update": {"x": 1}}, key=OTHER_KEY)) == "unknown_user"
    assert error_code(harness.event({"_id": "u-ann"}, {"update": {}}, key=OTHER_KEY)) == (
        "unknown_user"
    )


@pytest.mark.parametrize("storage", ["memory", "sqlite"])
def test_a_profile_id_of_another_workspace_finds_nothing_there(
    make_harness: Any, storage: str
) -> None:
    """Workspace a's profile "42" (a Firstparty client's own id) is not workspace b's to
    change: b's _id "42" finds b's user 42, and a's profile keeps its traits."""
    harness = make_harness(
        "core",
        storage,
        workspaces=[
            Workspace("a", sources=[Source(write_key=KEY, id="shop")]),
            Workspace("b", sources=[Source(write_key=OTHER_KEY, id="blog")]),
        ],
        sources=[],
    )
    assert harness.fp_track("Page Viewed", profile_id="42") == "42"
    harness.identify("42", key=OTHER_KEY)
    answer = harness.event({"_id": "42"}, {"update": {"plan": "pro"}}, key=OTHER_KEY)
    theirs = results(answer)["profile_id"]
    assert theirs != "42"
    assert harness.profile(theirs).traits == {"plan": "pro"}
    assert harness.profile("42").traits == {}


def test_a_source_of_the_same_workspace_shares_the_user(harness: Any) -> None:
    harness.identify("u-ann", traits=ANN)
    answer = harness.event(ANN, {"update": {"app": True}}, key=OTHER_KEY)
    assert results(answer)["profile_id"] == harness.events()[0].profile_id
    assert harness.events()[-1].source_id == "shop-b"


# -- update ----------------------------------------------------------------------------


def test_update_merges_attributes_into_the_profile_traits(harness: Any) -> None:
    harness.identify("u-ann", traits={"email": "ann@example.com", "plan": "free", "age": 30})
    first = results(harness.event(ANN, {"update": {"firstname": "alexandru", "plan": "pro"}}))
    results(harness.event({"_id": "u-ann"}, {"update": {"city": "Cluj"}}))
    assert harness.profile(first["profile_id"]).traits == {
        "email": "ann@example.com",
        "plan": "pro",
        "age": 30,
        "firstname": "alexandru",
        "city": "Cluj",
    }
    update = harness.events()[1]
    assert (update.type, update.name, update.source_id) == ("identify", None, "shop")
    payload = json.loads(update.payload)
    assert payload["type"] == "identify" and payload["eventType"] == "update"
    assert payload["user"] == ANN
    assert payload["traits"] == {"firstname": "alexandru", "plan": "pro"}
    assert payload["context"]["ip"] == "10.0.0.1"
    assert payload["receivedAt"] == update.received_at == payload["timestamp"]
    assert isinstance(payload["messageId"], str) and payload["messageId"] == update.message_id


def test_update_with_an_email_attribute_changes_traits_not_identities(harness: Any) -> None:
    harness.identify("u-ann", traits=ANN)
    profile_id = results(harness.event(ANN, {"update": {"email": "ann@work.example"}}))[
        "profile_id"
    ]
    profile = harness.profile(profile_id)
    assert profile.traits["email"] == "ann@work.example"
    assert {(i.kind, i.value) for i in profile.identities} == {
        ("user_id", "u-ann"),
        ("email", "ann@example.com"),
    }
    assert error_code(harness.event({"email": "ann@work.example"}, {"update": {}})) == (
        "unknown_user"
    )


def test_update_without_attributes_is_stored_and_changes_nothing(harness: Any) -> None:
    harness.identify("u-ann", traits=ANN)
    profile_id = results(harness.event(ANN, {"update": None}))["profile_id"]
    assert harness.profile(profile_id).traits == ANN
    assert json.loads(harness.events()[-1].payload)["traits"] == {}


def test_the_clients_timestamp_messageid_and_context_are_kept(harness: Any) -> None:
    harness.identify("u-ann", traits=ANN)
    answer = harness.event(
        ANN,
        {"update": {"a": 1}},
        messageId="m-42",
        timestamp="2023-11-14T22:00:00.000Z",
        context={"ip": "1.2.3.4", "locale": "ro-RO"},
    )
    results(answer)
    event = harness.events()[-1]
    payload = json.loads(event.payload)
    assert event.message_id == payload["messageId"] == "m-42"
    assert payload["originalTimestamp"] == "2023-11-14T22:00:00.000Z"
    assert payload["timestamp"] == event.timestamp == "2023-11-14T22:00:00.000Z"
    assert payload["context"] == {"ip": "1.2.3.4", "locale": "ro-RO"}


# -- login -----------------------------------------------------------------------------


def test_login_attaches_an_unowned_email_to_the_users_profile(harness: Any) -> None:
    harness.identify("u-bob")
    (identify,) = harness.events()
    answer = harness.event(
        {"_id": "u-bob"}, {"login": {"email": "Bob@Example.com", "firstname": "Bob"}}
    )
    assert results(answer)["profile_id"] == identify.profile_id
    profile = harness.profile(identify.profile_id)
    assert {(i.kind, i.value) for i in profile.identities} == {
        ("user_id", "u-bob"),
        ("email", "bob@example.com"),
    }
    assert profile.traits == {"email": "Bob@Example.com", "firstname": "Bob"}
    # The email now names Bob.
    later = harness.event({"email": "bob@example.com"}, {"update": {"plan": "pro"}})
    assert results(later)["profile_id"] == identify.profile_id
    login = json.loads(harness.events()[1].payload)
    assert (login["type"], login["eventType"]) == ("identify", "login")


def test_login_with_an_email_an_older_profile_owns_joins_the_two_into_the_oldest(
    harness: Any, clock: Any
) -> None:
    harness.identify("u-old", traits={"email": "carol@example.com", "plan": "gold"})
    results(harness.event({"_id": "u-old"}, {"generic": {"event_name": "Video Played"}}))
    clock.advance(3600)
    harness.identify("u-new", traits={"plan": "trial", "device": "phone"})
    results(harness.event({"_id": "u-new"}, {"update": {"color": "red"}}))
    old_id, _, new_id, _ = (e.profile_id for e in harness.events())
    assert old_id != new_id

    answer = harness.event({"_id": "u-new"}, {"login": {"email": "CAROL@example.com"}})
    assert results(answer) == {"message": "Event created", "_id": CREATED, "profile_id": old_id}
    survivor = harness.profile(new_id)  # followed through the merge
    assert survivor.id == old_id
    assert {(i.kind, i.value) for i in survivor.identities} == {
        ("user_id", "u-old"),
        ("user_id", "u-new"),
        ("email", "carol@example.com"),
    }
    # The survivor's traits win; the merged profile's fill the gaps; the login's apply last.
    assert survivor.traits == {
        "email": "CAROL@example.com",
        "plan": "gold",
        "device": "phone",
        "color": "red",
    }
    # Every event of either person is now Carol's, and later events land on her.
    events = harness.events()
    assert {harness.profile(e.profile_id).id for e in events} == {old_id}
    after = harness.event({"_id": "u-new"}, {"update": {"merged": True}})
    assert results(after)["profile_id"] == old_id


def test_login_onto_a_newer_profile_keeps_the_users_older_one(harness: Any, clock: Any) -> None:
    harness.identify("u-dan")
    clock.advance(60)
    harness.fp_track("Form Completed", email="dan@example.com")
    dan, newer = (e.profile_id for e in harness.events())
    answer = harness.event({"_id": dan}, {"login": {"email": "dan@example.com"}})
    assert results(answer)["profile_id"] == dan
    assert harness.profile(newer).id == dan


def test_login_by_profile_id_onto_an_older_owner_moves_the_user_onto_it(
    harness: Any, clock: Any
) -> None:
    older = harness.fp_track("Form Completed", email="erin@example.com")
    clock.advance(60)
    newer = harness.fp_track("Page Viewed")
    answer = harness.event({"_id": newer}, {"login": {"email": "erin@example.com"}})
    assert results(answer)["profile_id"] == older
    assert harness.profile(newer).id == older
    assert results(harness.event({"_id": newer}, {"update": {}}))["profile_id"] == older


def test_login_with_the_users_own_email_changes_no_identity(harness: Any) -> None:
    harness.identify("u-ann", traits=ANN)
    answer = harness.event({"email": "ANN@example.com"}, {"login": {"email": "ann@EXAMPLE.com"}})
    profile = harness.profile(results(answer)["profile_id"])
    assert {(i.kind, i.value) for i in profile.identities} == {
        ("user_id", "u-ann"),
        ("email", "ann@example.com"),
    }


def test_login_for_an_unknown_user_creates_nobody(harness: Any) -> None:
    answer = harness.event({"_id": "u-ghost"}, {"login": {"email": "ghost@example.com"}})
    assert error_code(answer) == "unknown_user"
    later = harness.event({"email": "ghost@example.com"}, {"update": {}})
    assert error_code(later) == "unknown_user"


# -- generic, confirmation, email_open ------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        {"generic": {"generic": {"event_name": "my_event", "firstname": "alexandru"}}},
        {"generic": {"event_name": "my_event", "firstname": "alexandru"}},
    ],
    ids=["seed-nested", "flat"],
)
def test_generic_is_a_track_named_by_its_event_name(harness: Any, event: Any) -> None:
    harness.identify("u-ann", traits=ANN)
    profile_id = results(harness.event(ANN, event))["profile_id"]
    track = harness.events()[-1]
    assert (track.type, track.name, track.profile_id) == ("track", "my_event", profile_id)
    payload = json.loads(track.payload)
    assert (payload["type"], payload["event"], payload["eventType"]) == (
        "track",
        "my_event",
        "generic",
    )
    assert payload["user"] == ANN
    assert payload["properties"]["firstname"] == "alexandru"
    assert harness.profile(profile_id).traits == ANN  # generic sets no traits


@pytest.mark.parametrize(
    "attributes",
    [
        {},
        {"firstname": "a"},
        {"event_name": ""},
        {"event_name": "   "},
        {"event_name": 7},
        {"event_name": None},
        {"generic": {"firstname": "a"}},
        {"generic": {"generic": {"event_name": "too deep"}}},
    ],
)
def test_generic_without_an_event_name_is_refused(harness: Any, attributes: Any) -> None:
    harness.identify("u-ann", traits=ANN)
    answer = harness.event(ANN, {"generic": attributes})
    assert error_code(answer) == "invalid_event"
    assert "event_name" in answer.json["errors"][0]["description"]
    assert [r.reason for r in harness.rejections()] == ["invalid_event"]


def test_a_strict_source_refuses_a_generic_name_that_breaks_the_guidelines(
    make_harness: Any,
) -> None:
    strict = Source(write_key=KEY, id="shop", strict_event_names=True)
    harness = make_harness("core", "memory", sources=[strict])
    harness.identify("u-ann", traits=ANN)
    answer = harness.event(ANN, {"generic": {"event_name": "my_event"}})
    assert error_code(answer) == "event_name_not_allowed"
    assert results(harness.event(ANN, {"generic": {"event_name": "Video Played"}}))


@pytest.mark.parametrize(
    ("kind", "name"), [("confirmation", "Order Completed"), ("email_open", "Email Opened")]
)
def test_confirmation_and_email_open_are_stored_under_the_segment_spec_names(
    harness: Any, kind: str, name: str
) -> None:
    harness.identify("u-ann", traits=ANN)
    attributes = {"orderId": "o-1", "total": 99.5, "currency": "EUR", "email_id": "e-1"}
    profile_id = results(harness.event({"_id": "u-ann"}, {kind: attributes}))["profile_id"]
    (stored,) = harness.events(type="track")
    assert (stored.name, stored.profile_id, stored.source_id) == (name, profile_id, "shop")
    payload = json.loads(stored.payload)
    assert (payload["type"], payload["event"], payload["eventType"]) == ("track", name, kind)
    assert payload["properties"] == attributes
    assert payload["user"] == {"_id": "u-ann"}
    assert harness.events(name=name) == [stored]


# -- never a 500 ---------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
USERS = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {},
        optional={
            "email": st.sampled_from(["ann@example.com", "x@y", "nope", 3]),
            "_id": st.sampled_from(["u-ann", "", "PR" + "A" * 30, 5]),
        },
    ),
)
EVENTS = st.one_of(
    JSON,
    st.dictionaries(
        st.sampled_from(["update", "login", "generic", "confirmation", "email_open", "x"]),
        JSON
        | st.fixed_dictionaries(
            {},
            optional={
                "event_name": st.sampled_from(["Thing Done", "", 1]),
                "email": JSON,
                "orderId": JSON,
                "generic": JSON,
            },
        ),
        max_size=2,
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    user=USERS,
    event=EVENTS,
    extra=st.dictionaries(st.sampled_from(["messageId", "timestamp", "context"]), JSON, max_size=2),
)
def test_any_body_is_answered_in_one_of_the_seeds_shapes_and_never_lost(
    user: Any, event: Any, extra: dict[str, Any]
) -> None:
    collector = Collector(sources=[Source(write_key=KEY, id="shop")], storage="memory://")
    try:
        identify = collector.route("/v1/identify")
        assert identify is not None
        collector.handle(
            identify,
            Request(
                "POST",
                "/v1/identify",
                "",
                {},
                json.dumps({"writeKey": KEY, "userId": "u-ann", "traits": ANN}).encode(),
            ),
        )
        route = collector.route("/v1/event")
        assert route is not None
        body = {"writeKey": KEY, "user": user, "event": event, **extra}
        request = Request("POST", "/v1/event", "", {}, json.dumps(body).encode(), "10.0.0.1")
        response = collector.handle(route, request)
        answer = json.loads(response.body)
        stored = len(list(collector.store.events())) - 1
        refused = list(collector.store.rejections())
        if response.status == 200:
            assert set(answer) == {"results"}
            assert answer["results"]["message"] == "Event created"
            assert stored == 1 or [r.reason for r in refused] == [answer["results"]["discarded"]]
        else:
            assert response.status == 400, answer
            (error,) = answer["errors"]
            assert set(error) == {"message", "description", "code"}
            assert stored == 0
            assert [r.reason for r in refused] == [error["code"]]
    finally:
        collector.close()


def test_after_a_login_merge_the_survivors_events_include_the_merged_profiles(
    harness: Any, clock: Any
) -> None:
    harness.identify("u-old", traits={"email": "carol@example.com"})
    clock.advance(3600)
    harness.identify("u-new")
    results(harness.event({"_id": "u-new"}, {"update": {"color": "red"}}))
    old_id = harness.events()[0].profile_id
    results(harness.event({"_id": "u-new"}, {"login": {"email": "carol@example.com"}}))
    assert len(harness.events(profile_id=old_id)) == 4
