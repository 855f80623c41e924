"""RuleSet: rules run in order, a failing rule loses nothing, properties end immutable.

The seed (002) says "Properties on an Event are immutable after all Rules have run
immediately after collecting the Event"; the issue adds that a rule that raises never
loses the event. Each test below is one of those promises.
"""

from __future__ import annotations

import copy
import datetime
import doctest
import json
import pickle
from typing import Any

import pytest
import ujson

from fp_collect import event_names, rules
from fp_collect.decoding import encode_event
from fp_collect.errors import ConfigError
from fp_collect.rules import (
    DropProperty,
    FrozenDict,
    FrozenList,
    HashProperty,
    NotJSON,
    RenameEvent,
    RuleError,
    RuleSet,
    thaw,
)

Event = dict[str, Any]


def track(**overrides: Any) -> Event:
    event: Event = {
        "type": "track",
        "event": "Order Completed",
        "messageId": "m-1",
        "userId": "u-1",
        "timestamp": "2026-11-23T10:00:00.123Z",
        "receivedAt": "2026-11-23T10:00:00.200Z",
        "properties": {
            "order_id": "o-1",
            "revenue": 42.5,
            "products": [{"sku": "s-1", "tags": ["a", "b"]}],
        },
        "context": {"page": {"url": "https://shop.example/checkout"}, "ip": "203.0.113.9"},
    }
    event.update(overrides)
    return event


def append_trail(label: str) -> rules.Rule:
    def rule(event: Event) -> None:
        event["properties"].setdefault("trail", []).append(label)

    rule.__qualname__ = f"append_trail({label})"
    return rule


def raising(event: Event) -> None:
    event["properties"]["half_done"] = True  # changed before failing: must not stick
    raise RuntimeError("rule exploded")


# -- order ------------------------------------------------------------------------


def test_rules_run_in_order_and_each_sees_the_earlier_ones() -> None:
    seen: list[list[str]] = []

    def recorder(event: Event) -> None:
        seen.append(list(event["properties"]["trail"]))

    ruleset = RuleSet([append_trail("first"), append_trail("second"), recorder])
    result = ruleset.apply(track())

    assert seen == [["first", "second"]]
    assert result.event["properties"]["trail"] == ["first", "second"]
    assert result.errors == ()


def test_a_returned_dict_replaces_the_event_and_none_keeps_in_place_changes() -> None:
    def replace(event: Event) -> Event:
        return {**event, "properties": {"replaced": True}}

    def in_place(event: Event) -> None:
        event["properties"]["edited"] = True

    result = RuleSet([replace, in_place]).apply(track())

    assert result.event["properties"] == {"replaced": True, "edited": True}
    assert result.errors == ()


def test_rename_then_later_rules_see_the_new_name() -> None:
    names: list[str] = []
    ruleset = RuleSet(
        [RenameEvent("Order Completed", "Order Placed"), lambda e: names.append(e["event"])]
    )
    assert ruleset.apply(track()).event["event"] == "Order Placed"
    assert names == ["Order Placed"]


# -- immutability after the last rule -------------------------------------------------


def frozen_mutations(properties: Any) -> list[Any]:
    nested_dict = properties["products"][0]
    nested_list = properties["products"]
    return [
        lambda: properties.__setitem__("revenue", 0),
        lambda: properties.__delitem__("revenue"),
        lambda: properties.update(revenue=0),
        lambda: properties.pop("revenue"),
        lambda: properties.popitem(),
        lambda: properties.setdefault("new", 1),
        lambda: properties.clear(),
        lambda: properties.__ior__({"new": 1}),
        lambda: nested_dict.__setitem__("sku", "other"),
        lambda: nested_dict["tags"].append("c"),
        lambda: nested_list.append({}),
        lambda: nested_list.__setitem__(0, {}),
        lambda: nested_list.__delitem__(0),
        lambda: nested_list.extend([1]),
        lambda: nested_list.insert(0, 1),
        lambda: nested_list.pop(),
        lambda: nested_list.remove(nested_dict),
        lambda: nested_list.sort(),
        lambda: nested_list.reverse(),
        lambda: nested_list.clear(),
        lambda: nested_list.__iadd__([1]),
        lambda: nested_list.__imul__(2),
    ]


def test_properties_are_immutable_after_the_last_rule_nested_too() -> None:
    result = RuleSet([append_trail("only")]).apply(track())
    properties = result.event["properties"]
    before = copy.deepcopy(dict(properties))

    for mutate in frozen_mutations(properties):
        with pytest.raises(TypeError, match="cannot change after the last rule"):
            mutate()

    # A second __init__ call is the one mutation that does not raise: it must be inert.
    properties.__init__({"other": 1})
    properties["products"].__init__([])
    assert properties == before
    assert properties["trail"] == ["only"]


def test_properties_stay_immutable_when_the_last_rule_is_rolled_back() -> None:
    result = RuleSet([append_trail("kept"), raising]).apply(track())

    assert isinstance(result.event["properties"], FrozenDict)
    with pytest.raises(TypeError):
        result.event["properties"]["trail"].append("more")


def test_the_rest_of_the_event_stays_an_ordinary_dict() -> None:
    # Only properties are promised immutable; later stages may still enrich context.
    result = RuleSet([append_trail("x")]).apply(track())
    result.event["context"]["library"] = {"name": "fp-collect"}
    result.event["receivedAt"] = "2026-11-23T10:00:01.000Z"
    assert type(result.event) is dict


def test_frozen_properties_are_still_dicts_and_lists_to_every_reader() -> None:
    result = RuleSet([append_trail("x")]).apply(track())
    properties = result.event["properties"]
    plain = thaw(result.event)

    assert isinstance(properties, dict) and isinstance(properties["products"], list)
    assert properties == plain["properties"]
    assert type(plain["properties"]) is dict and type(plain["properties"]["products"]) is list
    assert ujson.loads(ujson.dumps(result.event)) == plain
    assert json.loads(json.dumps(result.event)) == plain
    assert json.loads(encode_event(result.event)) == plain
    for clone in (copy.copy(properties), copy.deepcopy(properties)):
        assert clone == properties and isinstance(clone, FrozenDict)
    unpickled = pickle.loads(pickle.dumps(properties))
    assert unpickled == properties and isinstance(unpickled["products"], FrozenList)


def test_no_rules_is_free_the_event_comes_back_untouched() -> None:
    event = track()
    result = RuleSet([]).apply(event)
    assert result.event is event
    assert result.errors == ()
    assert len(RuleSet()) == 0


# -- a failing rule loses nothing ---------------------------------------------------


def test_a_raising_rule_loses_nothing_and_later_rules_still_run() -> None:
    event = track()
    ruleset = RuleSet([append_trail("before"), raising, append_trail("after")])
    result = ruleset.apply(event)

    assert result.event["properties"]["trail"] == ["before", "after"]
    assert "half_done" not in result.event["properties"]
    expected = track()
    expected["properties"]["trail"] = ["before", "after"]
    assert result.event == expected
    assert result.errors == (
        RuleError(rule_index=1, rule_name="raising", message="raised RuntimeError: rule exploded"),
    )


def test_the_given_event_is_never_changed() -> None:
    event = track()
    pristine = copy.deepcopy(event)
    RuleSet([append_trail("x"), raising, DropProperty("revenue")]).apply(event)
    assert event == pristine


def test_every_rule_failing_keeps_the_event_as_it_came() -> None:
    result = RuleSet([raising, raising, raising]).apply(track())
    assert result.event == track()
    assert [error.rule_index for error in result.errors] == [0, 1, 2]


def test_a_rule_that_keeps_a_reference_cannot_change_the_result_later() -> None:
    kept: list[Event] = []

    def sneaky(event: Event) -> None:
        kept.append(event)

    result = RuleSet([sneaky]).apply(track())
    kept[0]["context"]["ip"] = "changed"
    kept[0]["properties"]["revenue"] = 0
    assert result.event["context"]["ip"] == "203.0.113.9"
    assert result.event["properties"]["revenue"] == 42.5


def test_declarative_rules_after_a_callable_never_edit_what_it_kept() -> None:
    kept: list[Event] = []

    def sneaky(event: Event) -> None:
        kept.append(event)

    result = RuleSet(
        [sneaky, DropProperty("revenue"), RenameEvent("Order Completed", "X Y")]
    ).apply(track())
    assert kept[0]["properties"]["revenue"] == 42.5 and kept[0]["event"] == "Order Completed"
    kept[0]["properties"]["order_id"] = "changed"
    assert result.event["properties"]["order_id"] == "o-1"
    assert "revenue" not in result.event["properties"] and result.event["event"] == "X Y"


def test_a_failing_declarative_rule_keeps_the_others_edits() -> None:
    event = track(properties={"email": float("nan"), "plan": "pro"})
    result = RuleSet(
        [
            RenameEvent("Order Completed", "Order Placed"),
            HashProperty("email"),
            DropProperty("plan"),
        ]
    ).apply(event)

    assert result.event["event"] == "Order Placed"
    assert list(result.event["properties"]) == ["email"]
    assert isinstance(result.event["properties"], FrozenDict)
    assert [(e.rule_index, e.message.split(":")[0]) for e in result.errors] == [
        (1, "raised ValueError")
    ]
    assert event["event"] == "Order Completed" and "plan" in event["properties"]


def test_a_broken_exception_message_is_still_recorded() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise ValueError("no")

    def rule(event: Event) -> None:
        raise Unprintable

    result = RuleSet([rule]).apply(track())
    assert result.errors[0].message == "raised Unprintable: <unprintable Unprintable>"


def test_long_and_unstorable_error_text_is_shortened_and_escaped() -> None:
    def rule(event: Event) -> None:
        raise ValueError("\ud800" + "x" * 10_000)

    message = RuleSet([rule]).apply(track()).errors[0].message
    message.encode("utf-8")
    assert len(message) < 600


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        pytest.param(
            lambda e: ["not", "a", "dict"], "returned list, not a dict or None", id="list"
        ),
        pytest.param(lambda e: "text", "returned str, not a dict or None", id="str"),
        pytest.param(
            lambda e: {**e, "type": "page"}, "changed type from 'track' to 'page'", id="type"
        ),
        pytest.param(
            lambda e: {k: v for k, v in e.items() if k != "type"}, "changed type", id="no-type"
        ),
        pytest.param(lambda e: e.pop("event") and None, "without a name", id="no-name"),
        pytest.param(lambda e: e.update(event=""), "without a name", id="empty-name"),
        pytest.param(lambda e: e.update(event=7), "without a name", id="int-name"),
        pytest.param(lambda e: e.update(messageId="m-2"), "changed messageId", id="message-id"),
        pytest.param(lambda e: e.pop("timestamp") and None, "removed timestamp", id="timestamp"),
        pytest.param(
            lambda e: e.pop("userId") and None, "removed both userId and anonymousId", id="identity"
        ),
        pytest.param(lambda e: e.update(userId=5), "set userId to a int, not a string", id="user"),
        pytest.param(
            lambda e: e.update(properties=[1]),
            "set properties to a list, not an object",
            id="props",
        ),
        pytest.param(
            lambda e: e.update(context="ctx"), "set context to a str, not an object", id="context"
        ),
        pytest.param(
            lambda e: e["properties"].update(when=datetime.date(2026, 1, 1)),
            "left a value JSON cannot hold: date is not a JSON value",
            id="date",
        ),
        pytest.param(
            lambda e: e["properties"].update(tags={"a", "b"}),
            "left a value JSON cannot hold: set",
            id="set",
        ),
    ],
)
def test_a_rule_that_breaks_the_event_is_rolled_back(rule: Any, problem: str) -> None:
    result = RuleSet([append_trail("before"), rule, append_trail("after")]).apply(track())

    expected = track()
    expected["properties"]["trail"] = ["before", "after"]
    assert result.event == expected
    assert len(result.errors) == 1
    assert result.errors[0].rule_index == 1
    assert result.errors[0].rule_name.endswith("<lambda>")
    assert problem in result.errors[0].message


def test_problems_quoting_huge_values_are_shortened() -> None:
    result = RuleSet([lambda e: {**e, "type": "x" * 100_000}]).apply(track())
    assert result.errors[0].message.startswith("changed type from 'track' to 'xxx")
    assert len(result.errors[0].message) <= 500


def test_a_broken_last_rule_is_rolled_back_too() -> None:
    result = RuleSet([lambda e: e.update(event="")]).apply(track())
    assert result.event == track()
    assert len(result.errors) == 1


def test_rules_may_change_what_they_do_not_break() -> None:
    def edit(event: Event) -> None:
        event["userId"] = None  # anonymousId remains
        event["context"].pop("ip")
        event["timestamp"] = "2026-11-23T09:00:00.000Z"

    page = track(type="page", name="Checkout", anonymousId="a-1")
    del page["event"]
    result = RuleSet([edit, lambda e: e.pop("name") and None]).apply(page)
    assert result.errors == ()
    assert "name" not in result.event and "ip" not in result.event["context"]
    assert result.event["timestamp"] == "2026-11-23T09:00:00.000Z"


def test_a_rule_is_not_blamed_for_what_was_wrong_before_it() -> None:
    odd = track(properties=[1, 2], userId=7)
    result = RuleSet([lambda e: None]).apply(odd)
    assert result.errors == ()
    assert result.event == odd


def test_rules_errors_name_the_rule() -> None:
    class Callable:
        def __call__(self, event: Event) -> None:
            raise ValueError("x")

    result = RuleSet([HashProperty("email", salt="s3cret"), Callable(), raising]).apply(
        track(properties={"email": {"bad": float("nan")}})
    )
    names = [error.rule_name for error in result.errors]
    assert names[0] == "HashProperty(name='email')"  # the salt is never shown
    assert "Callable object" in names[1]
    assert names[2] == "raising"


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [raising, "rename", {"a": raising}, [raising, 3]])
def test_rule_sets_are_validated_eagerly(bad: Any) -> None:
    with pytest.raises(ConfigError):
        RuleSet(bad)


def test_thaw_and_freeze_refuse_what_json_cannot_hold() -> None:
    with pytest.raises(NotJSON):
        thaw({"a": object()})
    with pytest.raises(NotJSON):
        rules.freeze([b"bytes"])
    assert thaw({"t": (1, [2])}) == {"t": [1, [2]]}


def test_a_non_json_event_is_the_callers_bug() -> None:
    with pytest.raises(TypeError):
        RuleSet([raising]).apply({"type": "track", "when": datetime.date(2026, 1, 1)})


@pytest.mark.parametrize("module", [rules, event_names], ids=lambda m: m.__name__)
def test_documented_examples_run(module: Any) -> None:
    failures, attempted = doctest.testmod(module)
    assert attempted > 0 and failures == 0
