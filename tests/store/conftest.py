"""The ``store`` fixture: every contract test runs once per backend.

A backend needing a server takes its base URL from the root conftest's service fixtures
(skipped off CI when the service is down, failed under ``CI=true``) and gets a private
namespace per test, so tests never see each other's rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fp_collect.store import Store, open_store

BACKENDS = ["memory", "sqlite"]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A storage URL for an empty store of the parametrised backend."""
    if request.param == "memory":
        yield "memory://"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:  # pragma: no cover - a new backend must be added above
        raise AssertionError(request.param)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with open_store(store_url) as opened:
        yield opened
