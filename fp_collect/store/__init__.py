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
    """Open the backend a storage URL names: ``sqlite:///path.db`` or ``memory://``."""
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
    raise ConfigError(f"unknown storage scheme {scheme!r} in {url!r}; use sqlite:// or memory://")
