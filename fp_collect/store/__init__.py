"""Storage backends, selected by URL."""

from __future__ import annotations

from fp_collect.errors import ConfigError
from fp_collect.store.base import (
    DUPLICATE,
    STORED,
    Batch,
    Claim,
    EventRecord,
    Outcome,
    Query,
    RejectionRecord,
    Store,
    StoredEvent,
    StoredRejection,
)

__all__ = [
    "DUPLICATE",
    "STORED",
    "Batch",
    "Claim",
    "EventRecord",
    "Outcome",
    "Query",
    "RejectionRecord",
    "Store",
    "StoredEvent",
    "StoredRejection",
    "open_store",
]


def open_store(url: str) -> Store:
    """Open the backend a storage URL names.

    ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` (the default, one machine),
    ``memory://`` (tests), ``postgresql://...`` (needs ``fp-collect[postgres]``) and
    ``redis://...`` (needs ``fp-collect[redis]``).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(f"storage URL {url!r} has no scheme (try 'sqlite:///events.db')")
    if scheme == "memory":
        from fp_collect.store.memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite":
        from fp_collect.store.sqlite import SQLiteStore

        path = rest[1:] if rest.startswith("/") else rest
        if not path:
            raise ConfigError(f"storage URL {url!r} names no file (try 'sqlite:///events.db')")
        return SQLiteStore(path)
    if scheme in ("postgresql", "postgres"):
        _require_extra("psycopg", "postgres", url)
        _require_extra("psycopg_pool", "postgres", url)
        from fp_collect.store.postgres import PostgresStore

        return PostgresStore(url)
    if scheme in ("redis", "rediss"):
        _require_extra("redis", "redis", url)
        from fp_collect.store.redis_streams import RedisStore

        return RedisStore(url)
    raise ConfigError(
        f"unknown storage scheme {scheme!r} in {url!r}; use sqlite://, postgresql://, "
        "redis://, rediss:// or memory://"
    )


def _require_extra(module: str, extra: str, url: str) -> None:
    """Fail with the install command when a backend's driver is missing."""
    try:
        __import__(module)
    except ImportError as exc:
        raise ConfigError(
            f"storage URL {url.partition('://')[0]}:// needs the {module!r} package: "
            f"pip install 'fp-collect[{extra}]'"
        ) from exc
