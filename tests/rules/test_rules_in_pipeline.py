"""Rules and the naming guidelines as the pipeline applies them, per source, both APIs."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fp_collect import Collector, Query, Request, Source
from fp_collect.cli import main as cli
from fp_collect.rules import CopyContextField, DropProperty, HashProperty, RenameEvent

RULES: list[Any] = [
    RenameEvent("signup", "Signed Up"),
    DropProperty("password"),
    HashProperty("email"),
    CopyContextField("page.url", "url"),
]


def explode(event: dict[str, Any]) -> None:
    event["properties"]["half-done"] = True
    raise RuntimeError("boom")


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    made = Collector(
        sources=[
            # A plain list, made a RuleSet by Source.
            Source(write_key="ruled", id="ruled", rules=[*RULES, explode]),
            Source(write_key="strict", id="strict", strict_event_names=True),
            Source(write_key="plain", id="plain"),
        ],
        storage=f"sqlite:///{tmp_path / 'rules.db'}",
    )
    yield made
    made.close()


def segment_track(collector: Collector, key: str, event: str, **fields: Any) -> int:
    body = {"userId": "u-1", "event": event, **fields}
    header = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    route = collector.route("/v1/track")
    assert route is not None
    request = Request("POST", "/v1/track", "", {"authorization": header,
                      "content-type": "application/json"}, json.dumps(body).encode())  # fmt: skip
    return collector.handle(route, request).status.value


def firstparty(collector: Collector, key: str, event: str, **fields: Any) -> dict[str, Any]:
    route = collector.route("/events/track")
    assert route is not None
    body = json.dumps({"event": event, "write_key": key, **fields}).encode()
    response = collector.handle(route, Request("POST", "/events/track", body=body))
    answer: dict[str, Any] = json.loads(response.body)
    return answer


def stored(collector: Collector, source: str) -> list[dict[str, Any]]:
    return [json.loads(e.payload) for e in collector.store.events(Query(source_id=source))]


def test_rules_run_in_order_and_a_raising_rule_loses_nothing(collector: Collector) -> None:
    properties = {"password": "hunter2", "email": "ann@example.com", "plan": "pro"}
    context = {"page": {"url": "https://shop.example/join"}}
    assert segment_track(collector, "ruled", "signup", properties=properties,
                         context=context) == 200  # fmt: skip
    assert firstparty(collector, "ruled", "signup", properties=properties,
                      context=context)["success"]  # fmt: skip
    for event in stored(collector, "ruled"):
        assert event["event"] == "Signed Up"
        assert "password" not in event["properties"] and "half-done" not in event["properties"]
        assert event["properties"]["email"] != "ann@example.com"
        assert len(event["properties"]["email"]) == 64
        assert event["properties"]["url"] == "https://shop.example/join"
        assert event["properties"]["plan"] == "pro"
    flagged = list(collector.store.events(Query(source_id="ruled", flagged=True)))
    assert len(flagged) == 2
    for row in flagged:
        assert any("explode" in w and "boom" in w for w in row.warnings)


def test_names_breaking_the_guidelines_are_stored_with_warnings(collector: Collector) -> None:
    assert segment_track(collector, "plain", "Page Viewed") == 200
    assert segment_track(collector, "plain", "button clicked") == 200
    assert firstparty(collector, "plain", "Product 126")["success"]
    flagged = list(collector.store.events(Query(source_id="plain", flagged=True)))
    assert [e.name for e in flagged] == ["button clicked", "Product 126"]
    assert all(w.startswith("event name: ") for e in flagged for w in e.warnings)
    clean = next(iter(collector.store.events(Query(source_id="plain"))))
    assert (clean.name, clean.warnings) == ("Page Viewed", ())


def test_strict_sources_refuse_and_record_bad_names(collector: Collector) -> None:
    assert segment_track(collector, "strict", "Cart-Abandoned") == 400
    answer = firstparty(collector, "strict", "form submitted")
    assert answer["success"] is False and answer["code"] == "event_name_not_allowed"
    assert segment_track(collector, "strict", "Cart Abandoned") == 200
    assert [e.name for e in collector.store.events(Query(source_id="strict"))] == ["Cart Abandoned"]
    reasons = [r.reason for r in collector.store.rejections(Query(source_id="strict"))]
    assert reasons == ["event_name_not_allowed", "event_name_not_allowed"]


def test_the_cli_lists_flagged_events(
    collector: Collector, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    segment_track(collector, "plain", "button clicked", messageId="m-1")
    segment_track(collector, "plain", "Button Clicked", messageId="m-2")
    assert cli(["events", "--storage", f"sqlite:///{tmp_path / 'rules.db'}", "--flagged"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    listed = json.loads(line)
    assert listed["message_id"] == "m-1" and listed["event"]["event"] == "button clicked"
    assert listed["warnings"] and listed["warnings"][0].startswith("event name: Not Title Case")
