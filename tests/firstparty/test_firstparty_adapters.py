"""Both adapters serve the Firstparty endpoints, on SQLite."""

from __future__ import annotations

from pathlib import Path

from flask import Flask
from starlette.applications import Starlette
from starlette.testclient import TestClient
from werkzeug.test import Client

from fp_collect import Collector, Source
from fp_collect.adapters.asgi import CollectorMiddleware
from fp_collect.adapters.wsgi import init_app

EVENTS: list[dict[str, object]] = [
    {"event": "Page Viewed"},
    {"event": "Button Clicked", "properties": {"id": "buy"}},
]


def collector(tmp_path: Path) -> Collector:
    return Collector(
        sources=[Source(write_key="k", id="site")],
        storage=f"sqlite:///{tmp_path / 'fp.db'}",
        prefix="/collect",
    )


def test_flask_serves_firstparty(tmp_path: Path) -> None:
    app = Flask(__name__)
    made = init_app(app, collector=collector(tmp_path))
    client = Client(app)
    single = client.post("/collect/events/track", json={"event": "Page Viewed", "write_key": "k"})
    bulk = client.post("/collect/events/track/bulk", json={"events": EVENTS, "write_key": "k"})
    assert single.status_code == bulk.status_code == 200
    profile = single.get_json()["profile_id"]
    assert [e["success"] for e in bulk.get_json()["events"]] == [True, True]
    assert next(e.profile_id for e in made.store.events()) == profile
    assert len(list(made.store.events())) == 3
    made.close()


def test_starlette_serves_firstparty(tmp_path: Path) -> None:
    made = collector(tmp_path)
    app = Starlette()
    app.add_middleware(CollectorMiddleware, collector=made)
    with TestClient(app) as client:
        single = client.post(
            "/collect/events/track", json={"event": "Page Viewed", "write_key": "k"}
        )
        bulk = client.post("/collect/events/track/bulk", json=[{**e, "write_key": "k"}
                                                                for e in EVENTS])  # fmt: skip
    assert single.status_code == bulk.status_code == 200
    answers = [single.json(), *bulk.json()["events"]]
    stored = list(made.store.events())
    assert [(e.profile_id, e.session_id) for e in stored] == [
        (a["profile_id"], a["session_id"]) for a in answers
    ]
