"""The read API: events by source with cursor pagination, profiles, read tokens."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.testclient import TestClient
from werkzeug.test import Client

from fp_collect import Collector, Request, Source
from fp_collect.adapters.asgi import CollectorMiddleware
from fp_collect.adapters.wsgi import CollectorMiddleware as WSGIMiddleware

TOKEN = "read-token-0123456789"
SOURCES = [Source(write_key="key-a", id="a"), Source(write_key="key-b", id="b")]


class Clock:
    now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make(**options: Any) -> Collector:
    values: dict[str, Any] = {"sources": SOURCES, "storage": "memory://", "read_tokens": (TOKEN,)}
    values.update(options)
    return Collector(**values)


@pytest.fixture
def collector() -> Iterator[Collector]:
    made = make(clock=Clock())
    yield made
    made.close()


def call(collector: Collector, method: str, path: str, query: str = "", body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:  # fmt: skip
    route = collector.route(path)
    assert route is not None, path
    raw = json.dumps(body).encode() if body is not None else b""
    request = Request(method, path, query, {"content-type": "application/json", **(headers or {})},
                      raw, "10.0.0.1")  # fmt: skip
    response = collector.handle(route, request)
    return response.status.value, json.loads(response.body) if response.body else None


def read(collector: Collector, path: str, query: str = "", token: str = TOKEN) -> tuple[int, Any]:
    return call(collector, "GET", path, query, headers={"authorization": f"Bearer {token}"})


def track(collector: Collector, key: str, name: str, **fields: Any) -> dict[str, Any]:
    status, answer = call(collector, "POST", "/events/track",
                          body={"event": name, "write_key": key, **fields})  # fmt: skip
    assert status == 200 and answer["success"], answer
    return dict(answer)


def test_the_read_api_is_not_mounted_without_a_read_token() -> None:
    collector = make(read_tokens=())
    assert collector.route("/events") is None
    assert collector.route("/profiles/PR1") is None


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer ", "Bearer wrong-token-0123456789", f"Basic {TOKEN}", "Bearer key-a",
     "Basic " + base64.b64encode(b"key-a:").decode()],
)  # fmt: skip
def test_reads_need_a_valid_read_token(collector: Collector, authorization: str | None) -> None:
    track(collector, "key-a", "Page Viewed")
    headers = {} if authorization is None else {"authorization": authorization}
    for path, query in (("/events", "source_id=a"), ("/profiles/PR1", "")):
        route = collector.route(path)
        assert route is not None
        response = collector.handle(route, Request("GET", path, query, headers))
        assert response.status == 401
        assert ("www-authenticate", 'Bearer realm="fp-collect"') in response.headers
        assert b"Page Viewed" not in response.body


def test_events_of_a_source_with_their_ids_and_payload(collector: Collector) -> None:
    answer = track(collector, "key-a", "Page Viewed", properties={"path": "/"})
    track(collector, "key-b", "Other Source")
    status, body = read(collector, "/events", "source_id=a")
    assert status == 200 and body["next_cursor"] is None
    (event,) = body["events"]
    assert event["name"] == "Page Viewed" and event["source_id"] == "a"
    assert (event["profile_id"], event["session_id"]) == (answer["profile_id"],
                                                          answer["session_id"])  # fmt: skip
    stored = next(iter(collector.store.events()))
    assert event["event"] == json.loads(stored.payload)  # exactly as kept


def test_filters(collector: Collector) -> None:
    clock = collector.pipeline.clock
    assert isinstance(clock, Clock)
    first = track(collector, "key-a", "Page Viewed")
    clock.now += 3600
    track(collector, "key-a", "Order Completed", profile_id=first["profile_id"])
    track(collector, "key-a", "Page Viewed")

    def names(query: str) -> list[str]:
        status, body = read(collector, "/events", "source_id=a&" + query)
        assert status == 200, body
        return [e["name"] for e in body["events"]]

    assert names("event=Page+Viewed") == ["Page Viewed", "Page Viewed"]
    assert names(f"profile_id={first['profile_id']}") == ["Page Viewed", "Order Completed"]
    assert names("since=2023-11-14T23:13:20Z") == ["Order Completed", "Page Viewed"]
    assert names("until=2023-11-14T23:13:20%2B00:00") == ["Page Viewed"]
    assert names("type=track") == ["Page Viewed", "Order Completed", "Page Viewed"]
    assert names("type=identify") == []


@pytest.mark.parametrize(
    "query",
    ["", "source_id=", "source_id=a&limit=0", "source_id=a&limit=1001", "source_id=a&limit=x",
     "source_id=a&cursor=-1", "source_id=a&since=yesterday", "source_id=a&until=2024-13-01"],
)  # fmt: skip
def test_bad_parameters_are_400(collector: Collector, query: str) -> None:
    status, body = read(collector, "/events", query)
    assert status == 400 and body["error"] == "bad_request" and body["message"]


@given(
    sources=st.lists(st.sampled_from(["key-a", "key-b"]), max_size=25),
    page=st.integers(min_value=1, max_value=7),
)
def test_pagination_returns_every_event_of_a_source_exactly_once(
    sources: list[str], page: int
) -> None:
    collector = make()
    sent: dict[str, list[str]] = {"a": [], "b": []}
    for n, key in enumerate(sources):
        track(collector, key, "Page Viewed", message_id=f"m-{n}")
        sent[key[-1]].append(f"m-{n}")
    for source_id, expected in sent.items():
        seen: list[str] = []
        cursor = ""
        for _ in range(len(sources) + 2):  # bounded: a page per event at most, plus the end
            status, body = read(collector, "/events",
                                f"source_id={source_id}&limit={page}&cursor={cursor}")  # fmt: skip
            assert status == 200
            assert all(e["source_id"] == source_id for e in body["events"])
            seen += [e["message_id"] for e in body["events"]]
            if body["next_cursor"] is None:
                break
            cursor = body["next_cursor"]
        assert seen == expected
    collector.close()


def test_profiles_show_identities_and_traits(collector: Collector) -> None:
    header = "Basic " + base64.b64encode(b"key-a:").decode()
    status, _ = call(collector, "POST", "/v1/identify", body={
        "userId": "u-1", "traits": {"email": "Ann@Example.com", "plan": "pro"}},
        headers={"authorization": header})  # fmt: skip
    assert status == 200
    profile_id = next(iter(collector.store.events())).profile_id
    status, body = read(collector, f"/profiles/{profile_id}")
    assert status == 200
    assert body["id"] == profile_id and body["workspace"] == "default"
    assert body["traits"] == {"email": "Ann@Example.com", "plan": "pro"}
    assert sorted((i["kind"], i["value"]) for i in body["identities"]) == [
        ("email", "ann@example.com"), ("user_id", "u-1")]  # fmt: skip
    assert read(collector, "/profiles/PRnope")[0] == 404
    assert collector.route("/profiles/a/b") is None


def test_both_adapters_serve_reads(tmp_path: Path) -> None:
    collector = make(storage=f"sqlite:///{tmp_path / 'r.db'}")
    track(collector, "key-a", "Page Viewed")
    auth = {"authorization": f"Bearer {TOKEN}"}
    app = Starlette()
    app.add_middleware(CollectorMiddleware, collector=collector)
    with TestClient(app) as client:
        asgi = client.get("/events", params={"source_id": "a"}, headers=auth)
    wsgi = Client(WSGIMiddleware(lambda e, s: [], collector=collector)).get(
        "/events", query_string={"source_id": "a"}, headers=auth
    )
    assert asgi.status_code == wsgi.status_code == 200
    assert asgi.content == wsgi.get_data()
    assert [e["name"] for e in asgi.json()["events"]] == ["Page Viewed"]


def test_flagged_events_are_listed_with_their_warnings(collector: Collector) -> None:
    track(collector, "key-a", "Page Viewed")
    track(collector, "key-a", "button clicked")
    status, body = read(collector, "/events", "source_id=a&flagged=true")
    assert status == 200
    (event,) = body["events"]
    assert event["name"] == "button clicked"
    assert event["warnings"] and event["warnings"][0].startswith("event name: ")
    status, body = read(collector, "/events", "source_id=a")
    assert [e["warnings"] == [] for e in body["events"]] == [True, False]
    assert read(collector, "/events", "source_id=a&flagged=maybe")[0] == 400


def test_rejections_are_readable_too(collector: Collector) -> None:
    status, _ = call(collector, "POST", "/events/track", body={"write_key": "key-a"})
    assert status == 200  # the Firstparty API shows nothing in the status...
    call(collector, "POST", "/events/track", body={"event": "Page Viewed", "write_key": "nope"})
    status, body = read(collector, "/rejections", "source_id=a")
    assert status == 200 and body["next_cursor"] is None
    (missing,) = body["rejections"]  # ...so the read API is where problems show
    assert missing["reason"] == "missing_event" and json.loads(missing["payload"]) == {
        "write_key": "key-a"
    }
    status, body = read(collector, "/rejections", "reason=invalid_write_key")
    assert [r["source_id"] for r in body["rejections"]] == [None]
    route = collector.route("/rejections")
    assert route is not None
    assert collector.handle(route, Request("GET", "/rejections")).status == 401


@pytest.mark.parametrize("path", ["/events", "/rejections", "/profiles/PR123"])
def test_the_read_api_is_never_offered_to_another_origin(collector: Collector, path: str) -> None:
    """The sources' allowed origins ("*" by default) say who may send events; reading is
    for the site's own server and pages. No CORS answer invites another origin's page to
    read with a token, whatever the sources allow."""
    route = collector.route(path)
    assert route is not None
    origin = {"origin": "https://evil.example"}
    preflight = collector.handle(route, Request("OPTIONS", path, "", {
        **origin, "access-control-request-method": "GET",
        "access-control-request-headers": "authorization"}, b""))  # fmt: skip
    assert preflight.status == 403
    assert not any(name.startswith("access-control-") for name, _ in preflight.headers)
    headers = {**origin, "authorization": f"Bearer {TOKEN}"}
    response = collector.handle(route, Request("GET", path, "source_id=a", headers, b""))
    assert response.status in (200, 404)
    assert not any(name.startswith("access-control-") for name, _ in response.headers)
    # Collection routes still answer the same origin (the sources allow "*").
    collect = collector.route("/events/track")
    assert collect is not None
    allowed = collector.handle(collect, Request("OPTIONS", "/events/track", "", origin, b""))
    assert allowed.status == 204
