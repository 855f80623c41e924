"""The ``store`` fixture: every contract test runs once per backend.

A backend needing a server takes its base URL from the root conftest's service fixtures
(skipped off CI when the service is down, failed under ``CI=true``) and gets a private
namespace per test, so tests never see each other's rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from fp_collect.store import Store, open_store

BACKENDS = ["memory", "sqlite", "postgresql", "redis"]


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
    elif request.param == "redis":
        # Asked for here, not as an argument, so only the redis runs need the server.
        with redis_prefix(request.getfixturevalue("redis_url")) as url:
            yield url
    else:  # pragma: no cover - a new backend must be added above
        raise AssertionError(request.param)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with open_store(store_url) as opened:
        yield opened


@contextmanager
def redis_prefix(base: str, **options: str) -> Iterator[str]:
    """``base`` with a fresh ``prefix=`` option (and ``options``); every key under that
    prefix is deleted afterwards."""
    prefix = f"fp-test-{uuid.uuid4().hex}:"
    parts = urlsplit(base)
    query = [*parse_qsl(parts.query), ("prefix", prefix), *options.items()]
    try:
        yield parts._replace(query=urlencode(query)).geturl()
    finally:
        delete_prefix(base, prefix)


def delete_prefix(base: str, prefix: str) -> None:
    """SCAN + UNLINK every key under ``prefix``: never FLUSHDB a shared server."""
    import redis

    client = redis.Redis.from_url(base)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=prefix + "*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)
    finally:
        client.close()
