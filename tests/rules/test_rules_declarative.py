"""The declarative rules: what users get without writing code."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from fp_collect.errors import ConfigError
from fp_collect.rules import CopyContextField, DropProperty, HashProperty, RenameEvent, RuleSet

Event = dict[str, Any]


def event(**fields: Any) -> Event:
    base: Event = {"type": "track", "event": "Signup", "messageId": "m-1", "userId": "u-1"}
    base.update(fields)
    return base


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- RenameEvent ------------------------------------------------------------------------


def test_rename_event_renames_track_events_by_their_event_field() -> None:
    message = event(name="Signup")
    RenameEvent("Signup", "Account Created")(message)
    assert message["event"] == "Account Created"
    assert message["name"] == "Signup"  # a track message's name is not its event name


@pytest.mark.parametrize("kind", ["page", "screen"])
def test_rename_event_renames_pages_and_screens_by_name(kind: str) -> None:
    message = {"type": kind, "name": "home", "event": "home", "messageId": "m"}
    RenameEvent("home", "Home")(message)
    assert message == {"type": kind, "name": "Home", "event": "home", "messageId": "m"}


def test_rename_event_leaves_other_names_alone() -> None:
    message = event(event="Order Completed")
    RenameEvent("Signup", "Account Created")(message)
    assert message["event"] == "Order Completed"
    message = {"type": "identify", "userId": "u"}
    RenameEvent("Signup", "Account Created")(message)
    assert message == {"type": "identify", "userId": "u"}


# -- DropProperty -----------------------------------------------------------------------


def test_drop_property_removes_one_property() -> None:
    message = event(properties={"email": "a@example.com", "plan": "pro"})
    DropProperty("email")(message)
    assert message["properties"] == {"plan": "pro"}


@pytest.mark.parametrize("properties", [{}, None, "absent"])
def test_drop_property_is_a_no_op_when_there_is_nothing_to_drop(properties: Any) -> None:
    message = event() if properties == "absent" else event(properties=properties)
    expected = dict(message)
    DropProperty("email")(message)
    assert message == expected


# -- HashProperty -----------------------------------------------------------------------


def test_hash_property_hashes_strings_as_their_text_with_the_salt_first() -> None:
    message = event(properties={"email": "ann@example.com", "plan": "pro"})
    HashProperty("email", salt="pepper")(message)
    assert message["properties"] == {"email": sha("pepperann@example.com"), "plan": "pro"}


def test_hash_property_without_salt_is_plain_sha256() -> None:
    message = event(properties={"email": "ann@example.com"})
    HashProperty("email")(message)
    assert message["properties"]["email"] == sha("ann@example.com")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (42, "42"),
        (4.5, "4.5"),
        (True, "true"),
        ([1, "é"], '[1,"é"]'),
        ({"b": 1, "a": [None]}, '{"a":[null],"b":1}'),
    ],
)
def test_hash_property_hashes_other_values_as_canonical_json(value: Any, text: str) -> None:
    message = event(properties={"account": value})
    HashProperty("account", salt="s")(message)
    assert message["properties"]["account"] == sha("s" + text)


def test_numbers_and_their_strings_hash_alike() -> None:
    as_number, as_string = event(properties={"id": 42}), event(properties={"id": "42"})
    HashProperty("id")(as_number)
    HashProperty("id")(as_string)
    assert as_number == as_string


@pytest.mark.parametrize("properties", [{"email": None}, {}, None])
def test_hash_property_leaves_absent_and_null_alone(properties: Any) -> None:
    message = event(properties=properties)
    expected = dict(message)
    HashProperty("email")(message)
    assert message == expected


def test_hash_property_accepts_a_lone_surrogate() -> None:
    message = event(properties={"email": "\ud800"})
    HashProperty("email")(message)
    assert len(message["properties"]["email"]) == 64


def test_hash_property_never_shows_its_salt() -> None:
    assert "pepper" not in repr(HashProperty("email", salt="pepper"))


# -- CopyContextField -------------------------------------------------------------------


def test_copy_context_field_copies_a_nested_value_into_properties() -> None:
    message = event(
        properties={"plan": "pro"},
        context={"campaign": {"source": "newsletter"}, "page": {"url": "https://x.example/"}},
    )
    CopyContextField("campaign.source", "utm_source")(message)
    CopyContextField("page.url", "url")(message)
    assert message["properties"] == {
        "plan": "pro",
        "utm_source": "newsletter",
        "url": "https://x.example/",
    }


@pytest.mark.parametrize(
    "context",
    [None, {}, {"campaign": {}}, {"campaign": "flat"}, {"campaign": [{"source": "x"}]}],
)
def test_copy_context_field_changes_nothing_when_the_path_is_absent(context: Any) -> None:
    message = event(context=context)
    expected = dict(message)
    CopyContextField("campaign.source", "utm_source")(message)
    assert message == expected


def test_copy_context_field_creates_properties_and_overwrites() -> None:
    message = event(context={"ip": "203.0.113.9"})
    CopyContextField("ip", "ip")(message)
    assert message["properties"] == {"ip": "203.0.113.9"}
    message["context"]["ip"] = "198.51.100.1"
    CopyContextField("ip", "ip")(message)
    assert message["properties"] == {"ip": "198.51.100.1"}


def test_copied_objects_are_not_shared_with_context() -> None:
    message = event(context={"campaign": {"source": "x", "tags": ["a"]}})
    CopyContextField("campaign", "campaign")(message)
    message["properties"]["campaign"]["tags"].append("b")
    assert message["context"]["campaign"]["tags"] == ["a"]


def test_copy_into_properties_that_are_not_an_object_is_an_error() -> None:
    result = RuleSet([CopyContextField("ip", "ip")]).apply(
        event(context={"ip": "x"}, properties=[1])
    )
    assert result.event["properties"] == [1]
    assert "properties is not an object" in result.errors[0].message


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: RenameEvent("", "New"),
        lambda: RenameEvent("Old", ""),
        lambda: RenameEvent("Old", None),  # type: ignore[arg-type]
        lambda: DropProperty(""),
        lambda: DropProperty(3),  # type: ignore[arg-type]
        lambda: HashProperty(""),
        lambda: HashProperty("email", salt=None),  # type: ignore[arg-type]
        lambda: CopyContextField("", "to"),
        lambda: CopyContextField("page.url", ""),
        lambda: CopyContextField("page..url", "url"),
        lambda: CopyContextField(".url", "url"),
        lambda: CopyContextField("context.page.url", "url"),
    ],
)
def test_declarative_rules_are_validated_eagerly(build: Any) -> None:
    with pytest.raises(ConfigError):
        build()


def test_declarative_rules_are_frozen_and_comparable() -> None:
    rule = CopyContextField("page.url", "url")
    assert rule == CopyContextField("page.url", "url")
    assert repr(rule) == "CopyContextField(path='page.url', to_property='url')"
    with pytest.raises(AttributeError):
        rule.path = "other"  # type: ignore[misc]
