"""The benchmark's hand-written apps store every event they answer 200 for.

``http_load.py`` compares fp-collect with them, so they must be what they claim: durable
before the answer. Driven in process (the HTTP smoke runs only fp-collect and the bare
app), on the track and the batch bodies the benchmark sends.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from flask.testing import FlaskClient
from starlette.testclient import TestClient

from tests.benchmarks.test_bench_smoke import load_http_load

APPS = Path(__file__).resolve().parents[2] / "benchmarks" / "apps"


def load_app_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, APPS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    db = tmp_path / "bench.db"
    monkeypatch.setenv("FP_BENCH_DB", str(db))
    monkeypatch.syspath_prepend(str(APPS))  # the apps import their shared module, common
    yield db
    sys.modules.pop("common", None)


def bodies() -> list[tuple[str, bytes, int]]:
    http_load = load_http_load()
    found = []
    for endpoint in ("track", "batch"):
        template = http_load.make_template(endpoint)
        found.append((f"/collect/v1/{endpoint}", template.render(1, "apps"), template.events))
    return found


def stored(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        (count,) = conn.execute("SELECT count(*) FROM events").fetchone()
    return int(count)


@pytest.mark.parametrize("app", ["handwritten", "grouped"])
def test_starlette_apps_store_before_answering(bench_db: Path, app: str) -> None:
    factory: Any = getattr(load_app_module("starlette_apps"), app)
    with TestClient(factory()) as client:
        expected = 0
        for path, body, events in bodies():
            response = client.post(path, content=body)
            assert response.status_code == 200
            expected += events
            assert stored(bench_db) == expected


@pytest.mark.parametrize("app", ["handwritten", "grouped"])
def test_flask_apps_store_before_answering(bench_db: Path, app: str) -> None:
    factory: Any = getattr(load_app_module("flask_apps"), app)
    client: FlaskClient = factory().test_client()
    expected = 0
    for path, body, events in bodies():
        response = client.post(path, data=body, content_type="application/json")
        assert response.status_code == 200
        expected += events
        assert stored(bench_db) == expected
