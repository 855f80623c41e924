"""The ``store`` fixture: every contract test runs once per backend.

A backend needing a server takes its base URL from the root conftest's service fixtures
(skipped off CI when the service is down, failed under ``CI=true``) and gets a private
namespace per test, so tests never see each other's rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fp_collect.store import Store, open_store

BACKENDS = ["memory", "sqlite", "postgresql"]


def with_query(url: str, **params: str) -> str:
    """``url`` with ``params`` added to its query string."""
    query = "&".join(f"{name}={value}" for name, value in params.items())
    return f"{url}{'&' if '?' in url else '?'}{query}"


def drop_schema(dsn: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def pg_schema(postgres_dsn: str) -> Iterator[str]:
    """A fresh PostgreSQL schema name on the shared server, dropped after the test.

    The database is shared with other people's test runs: everything a test creates
    lives in this schema and nowhere else.
    """
    schema = f"fpc_test_{uuid.uuid4().hex[:16]}"
    yield schema
    drop_schema(postgres_dsn, schema)


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A storage URL for an empty store of the parametrised backend."""
    if request.param == "memory":
        yield "memory://"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    elif request.param == "postgresql":
        dsn: str = request.getfixturevalue("postgres_dsn")
        schema: str = request.getfixturevalue("pg_schema")
        yield with_query(dsn, schema=schema)
    else:  # pragma: no cover - a new backend must be added above
        raise AssertionError(request.param)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with open_store(store_url) as opened:
        yield opened
