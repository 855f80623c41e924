"""Properties of RuleSet.apply over generated events and generated rule lists.

For any event of JSON values and any sequence of declarative, raising and identity
rules: apply never raises; only properties and the event's name change; the result is
storable; properties end frozen; and the result is exactly what running the rules one
by one (rolling back the ones that raise) gives.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import ujson
from hypothesis import given
from hypothesis import strategies as st

from fp_collect.decoding import encode_event
from fp_collect.rules import (
    CopyContextField,
    DropProperty,
    FrozenDict,
    HashProperty,
    RenameEvent,
    Rule,
    RuleSet,
    thaw,
)

Event = dict[str, Any]

NAMES = ["Order Completed", "Page Viewed", "signup", "home"]
PROPERTY_NAMES = ["email", "plan", "url", "nested", "utm_source"]
CONTEXT_PATHS = ["page.url", "campaign.source", "ip", "page", "missing.path"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
property_maps = st.dictionaries(st.sampled_from(PROPERTY_NAMES) | st.text(max_size=6), json_values)
contexts = st.fixed_dictionaries(
    {},
    optional={
        "page": st.fixed_dictionaries({}, optional={"url": json_values}) | json_values,
        "campaign": st.fixed_dictionaries({}, optional={"source": json_values}),
        "ip": st.text(max_size=15),
    },
)
segment_like = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["track", "page", "screen", "identify"]),
        "messageId": st.text(min_size=1, max_size=8),
        "userId": st.text(min_size=1, max_size=8),
    },
    optional={
        "event": st.sampled_from(NAMES),
        "name": st.sampled_from(NAMES),
        "properties": property_maps | st.none() | json_values,
        "context": contexts | json_values,
        "timestamp": st.just("2026-11-23T10:00:00.000Z"),
        "extra": json_values,
    },
)
# Anything at all, keys included: rules must cope with events no validator has seen.
arbitrary = st.dictionaries(
    st.sampled_from(["type", "event", "name", "properties", "context"]) | st.text(max_size=6),
    json_values,
)
events = segment_like | arbitrary


def raise_always(event: Event) -> None:
    event["touched"] = True
    raise RuntimeError("always")


def identity(event: Event) -> Event:
    return event


def no_op(event: Event) -> None:
    return None


non_empty = st.sampled_from(NAMES) | st.text(min_size=1, max_size=8)
rule_lists = st.lists(
    st.builds(RenameEvent, st.sampled_from(NAMES), non_empty)
    | st.builds(DropProperty, st.sampled_from(PROPERTY_NAMES))
    | st.builds(HashProperty, st.sampled_from(PROPERTY_NAMES), st.text(max_size=4))
    | st.builds(CopyContextField, st.sampled_from(CONTEXT_PATHS), st.sampled_from(PROPERTY_NAMES))
    | st.sampled_from([raise_always, identity, no_op]),
    max_size=6,
)


def name_field(event: Event) -> str:
    return "event" if event.get("type") == "track" else "name"


def one_by_one(rules: list[Rule], event: Event) -> Event:
    """The reference: each rule on a copy, rolled back if it raises."""
    current = copy.deepcopy(event)
    for rule in rules:
        candidate = copy.deepcopy(current)
        try:
            returned = rule(candidate)
        except Exception:  # noqa: BLE001 - the reference rolls back whatever a rule raises
            continue
        current = candidate if returned is None else returned
    return current


@given(events, rule_lists)
def test_apply_never_raises_and_changes_only_properties_and_the_name(
    event: Event, rules: list[Rule]
) -> None:
    pristine = copy.deepcopy(event)
    result = RuleSet(rules).apply(event)

    assert event == pristine
    kept = (set(pristine) | set(result.event)) - {"properties", name_field(pristine)}
    for key in kept:
        assert result.event.get(key, "<absent>") == pristine.get(key, "<absent>"), key
    ujson.dumps(result.event)
    json.loads(encode_event(result.event))


@given(events, rule_lists)
def test_apply_equals_running_the_rules_one_by_one(event: Event, rules: list[Rule]) -> None:
    result = RuleSet(rules).apply(event)

    assert result.event == one_by_one(rules, event)
    assert "touched" not in result.event or "touched" in event
    raised = {index for index, rule in enumerate(rules) if rule is raise_always}
    assert raised <= {error.rule_index for error in result.errors}


@given(events, rule_lists)
def test_properties_end_frozen_whenever_rules_ran(event: Event, rules: list[Rule]) -> None:
    result = RuleSet(rules).apply(event)
    properties = result.event.get("properties")
    if rules and isinstance(properties, dict):
        assert isinstance(properties, FrozenDict)
        assert thaw(properties) == properties


@given(events)
def test_without_rules_the_event_is_returned_as_is(event: Event) -> None:
    assert RuleSet([]).apply(event).event is event
