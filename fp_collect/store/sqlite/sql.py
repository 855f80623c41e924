"""The SQLite store's schema, its migrations and the statements the writer runs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fp_collect.decoding import dumps
from fp_collect.store.base import EventRecord

SCHEMA_VERSION = 4

SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version (version)
    SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM schema_version);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    source_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    type TEXT NOT NULL,
    name TEXT,
    user_id TEXT,
    anonymous_id TEXT,
    timestamp TEXT NOT NULL,
    received_at TEXT NOT NULL,
    payload TEXT NOT NULL,
    UNIQUE (source_id, message_id)
);
CREATE INDEX IF NOT EXISTS events_source ON events (source_id, id);
CREATE INDEX IF NOT EXISTS events_received ON events (received_at);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY,
    source_id TEXT,
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    received_at TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    payload TEXT NOT NULL,
    idx INTEGER,
    message_id TEXT
);
CREATE INDEX IF NOT EXISTS rejections_source ON rejections (source_id, id);
CREATE INDEX IF NOT EXISTS rejections_received ON rejections (received_at);
CREATE TABLE IF NOT EXISTS claims (
    source_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    until REAL,
    PRIMARY KEY (source_id, kind, key)
);
COMMIT;
"""

# Version 2: profiles, their identities and sessions; events remember both.
_MIGRATE_TO_2 = """
BEGIN IMMEDIATE;
ALTER TABLE events ADD COLUMN profile_id TEXT;
ALTER TABLE events ADD COLUMN session_id TEXT;
CREATE INDEX IF NOT EXISTS events_profile ON events (profile_id, id);
CREATE TABLE IF NOT EXISTS profiles (
    id TEXT PRIMARY KEY,
    scope TEXT NOT NULL,
    created_at REAL NOT NULL,
    traits TEXT NOT NULL,
    merged_into TEXT
);
CREATE TABLE IF NOT EXISTS identities (
    scope TEXT NOT NULL,
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    PRIMARY KEY (scope, kind, value)
);
CREATE INDEX IF NOT EXISTS identities_profile ON identities (profile_id);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    profile_id TEXT NOT NULL,
    started_at REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_profile ON sessions (profile_id, last_seen);
UPDATE schema_version SET version = 2;
COMMIT;
"""

# Version 3: warnings an event was stored with (a JSON array), NULL when none.
_MIGRATE_TO_3 = """
BEGIN IMMEDIATE;
ALTER TABLE events ADD COLUMN warnings TEXT;
CREATE INDEX IF NOT EXISTS events_flagged ON events (source_id, id) WHERE warnings IS NOT NULL;
UPDATE schema_version SET version = 3;
COMMIT;
"""
# Version 4: find the profiles merged into one (reading a profile's events follows merges).
_MIGRATE_TO_4 = """
BEGIN IMMEDIATE;
CREATE INDEX IF NOT EXISTS profiles_merged ON profiles (merged_into) WHERE merged_into IS NOT NULL;
UPDATE schema_version SET version = 4;
COMMIT;
"""
MIGRATIONS = {1: _MIGRATE_TO_2, 2: _MIGRATE_TO_3, 3: _MIGRATE_TO_4}

EVENT_COLUMNS = (
    "id, source_id, message_id, type, name, user_id, anonymous_id, timestamp, received_at,"
    " payload, profile_id, session_id, warnings"
)
REJECTION_COLUMNS = (
    "id, source_id, reason, message, received_at, endpoint, payload, idx, message_id"
)
INSERT_EVENT = (
    "INSERT INTO events (source_id, message_id, type, name, user_id, anonymous_id, timestamp,"
    " received_at, payload, profile_id, session_id, warnings)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (source_id, message_id) DO NOTHING"
)
UPSERT_CLAIM = "INSERT OR REPLACE INTO claims (source_id, kind, key, until) VALUES (?, ?, ?, ?)"
INSERT_PROFILE = "INSERT INTO profiles (id, scope, created_at, traits) VALUES (?, ?, ?, '{}')"
INSERT_IDENTITY = "INSERT INTO identities (scope, kind, value, profile_id) VALUES (?, ?, ?, ?)"
INSERT_REJECTION = (
    "INSERT INTO rejections (source_id, reason, message, received_at, endpoint, payload, idx,"
    " message_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)

Row = tuple[Any, ...]


def event_row(event: EventRecord, profile_id: str | None, session_id: str | None) -> Row:
    """The values of :data:`INSERT_EVENT` for ``event``."""
    return (
        event.source_id,
        event.message_id,
        event.type,
        event.name,
        event.user_id,
        event.anonymous_id,
        event.timestamp,
        event.received_at,
        event.payload,
        profile_id,
        session_id,
        dumps(list(event.warnings)) if event.warnings else None,
    )


# The lengths an "IN (...)" list is padded to (by repeating its last value): each length
# is a distinct statement, and a few of them stay in the connection's statement cache
# where one per group size would push out every other statement. The largest is far
# below SQLite's limit on parameters (32,766 since 3.32).
IN_SIZES = (1, 4, 16, 64, 256)


def chunks(values: set[str]) -> Iterator[list[str]]:
    ordered = sorted(values)  # neighbours in the index: fewer pages visited
    largest = IN_SIZES[-1]
    for start in range(0, len(ordered), largest):
        chunk = ordered[start : start + largest]
        size = next(size for size in IN_SIZES if size >= len(chunk))
        yield chunk + [chunk[-1]] * (size - len(chunk))


def marks(values: list[str]) -> str:
    return ", ".join("?" * len(values))
