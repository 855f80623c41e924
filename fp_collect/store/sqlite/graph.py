"""What the SQLite writer knows inside one write transaction: the identity graph over its
connection, and what a group's events will ask, looked up set-wise before it is written."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ujson

from fp_collect.store.base import Batch, Identity
from fp_collect.store.identity import traits_union
from fp_collect.store.sqlite.sql import (
    INSERT_EVENT,
    INSERT_IDENTITY,
    INSERT_PROFILE,
    UPSERT_CLAIM,
    Row,
    chunks,
    marks,
)


@dataclass(slots=True)
class Known:
    """What :func:`prefetch` found for a group, kept current while it is written:
    the (source, message id) already stored, and the ``until`` of every claim already
    held among the (source, kind, key) its events make (absent: not held)."""

    stored: set[tuple[str, str]] = field(default_factory=set)
    claims: dict[tuple[str, str, str], float | None] = field(default_factory=dict)


@dataclass(slots=True)
class Rows:
    """A group's events and claims, inserted with one statement each (after every batch
    of the group was decided: nothing decided later depends on these rows, only on
    :class:`Known`)."""

    events: list[Row] = field(default_factory=list)
    claims: list[Row] = field(default_factory=list)

    def insert(self, conn: sqlite3.Connection) -> None:
        if self.events:
            inserted = conn.executemany(INSERT_EVENT, self.events).rowcount
            if inserted != len(self.events):  # never, while we hold the write lock
                raise RuntimeError(f"{len(self.events) - inserted} events were stored meanwhile")
        if self.claims:
            conn.executemany(UPSERT_CLAIM, self.claims)


def prefetch(conn: sqlite3.Connection, graph: SQLGraph, batches: list[Batch]) -> Known:
    """Look up, a few hundred at a time, what a group's events will ask one by one:
    which (source, message id) are already stored and which of their claims are held
    -- returned --, and who owns each identity they name -- remembered by ``graph``.
    Inside the write transaction, so the answers hold until it ends."""
    message_ids: dict[str, set[str]] = {}
    claims: dict[tuple[str, str], set[str]] = {}
    identities: dict[tuple[str, str], set[str]] = {}
    for batch in batches:
        for event in batch.events:
            message_ids.setdefault(event.source_id, set()).add(event.message_id)
            for claim in event.claims:
                claims.setdefault((event.source_id, claim.kind), set()).add(claim.key)
            op = event.identity
            if op is not None:
                for identity in (*op.identities, *op.lookups):
                    identities.setdefault((op.scope, identity.kind), set()).add(identity.value)
    known = Known()
    for source_id, ids in message_ids.items():
        for chunk in chunks(ids):
            rows = conn.execute(
                "SELECT message_id FROM events WHERE source_id = ?"
                f" AND message_id IN ({marks(chunk)})",
                (source_id, *chunk),
            )
            known.stored.update((source_id, message_id) for (message_id,) in rows)
    for (source_id, kind), keys in claims.items():
        for chunk in chunks(keys):
            rows = conn.execute(
                "SELECT key, until FROM claims WHERE source_id = ? AND kind = ?"
                f" AND key IN ({marks(chunk)})",
                (source_id, kind, *chunk),
            )
            known.claims.update(((source_id, kind, key), until) for key, until in rows)
    for (scope, kind), values in identities.items():
        for chunk in chunks(values):
            graph.learn_owners(scope, kind, chunk)
    graph.learn_profiles()
    return known


class SQLGraph:
    """The identity primitives over one connection, inside one transaction.

    Within a write transaction (BEGIN IMMEDIATE) no other connection can change the
    file, so who owns an identity and where a profile was merged can be remembered until
    the transaction ends: identity resolution asks for each owner twice, and a visitor's
    events often come in the same group. Our own writes keep the memo current;
    :meth:`forget` after a rollback to a savepoint. A read-only graph (``profile``) uses
    a fresh instance per read.

    ``deferred``: new profiles and identities -- a row each per new visitor, the most
    common write after the event itself -- are kept and inserted with one statement
    apiece by :meth:`flush`, which runs before any other statement of the graph (so
    every query sees them) and must be called before the transaction commits. Only
    for a transaction without savepoints: a rollback to one would not undo them.
    """

    def __init__(self, conn: sqlite3.Connection, *, deferred: bool = False) -> None:
        self.conn = conn
        self._owners: dict[tuple[str, str, str], str | None] = {}
        self._canonical: dict[str, str | None] = {}
        self._deferred = deferred
        self._new_profiles: list[Row] = []
        self._new_identities: list[Row] = []

    def flush(self) -> None:
        """Insert the profiles and identities kept back (``deferred``)."""
        if self._new_profiles:
            self.conn.executemany(INSERT_PROFILE, self._new_profiles)
            self._new_profiles.clear()
        if self._new_identities:
            self.conn.executemany(INSERT_IDENTITY, self._new_identities)
            self._new_identities.clear()

    def _execute(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        self.flush()
        return self.conn.execute(sql, params)

    def forget(self) -> None:
        self._owners.clear()
        self._canonical.clear()

    def learn_owners(self, scope: str, kind: str, values: list[str]) -> None:
        """Look up the owners of many identities of one kind at once."""
        found = dict(
            self._execute(
                "SELECT value, profile_id FROM identities WHERE scope = ? AND kind = ?"
                f" AND value IN ({marks(values)})",
                (scope, kind, *values),
            ).fetchall()
        )
        for value in values:
            self._owners[(scope, kind, value)] = found.get(value)

    def learn_profiles(self) -> None:
        """Look up at once which of the known owners were never merged away."""
        unknown = {p for p in self._owners.values() if p is not None} - set(self._canonical)
        for chunk in chunks(unknown):
            rows = self._execute(
                f"SELECT id FROM profiles WHERE id IN ({marks(chunk)}) AND merged_into IS NULL",
                chunk,
            )
            self._canonical.update((profile_id, profile_id) for (profile_id,) in rows)

    def _one(self, sql: str, params: tuple[object, ...]) -> Any:
        row = self._execute(sql, params).fetchone()
        return None if row is None else row[0]

    def owner(self, scope: str, identity: Identity) -> str | None:
        key = (scope, identity.kind, identity.value)
        if key in self._owners:
            return self._owners[key]
        owner: str | None = self._one(
            "SELECT profile_id FROM identities WHERE scope = ? AND kind = ? AND value = ?", key
        )
        self._owners[key] = owner
        return owner

    def canonical(self, profile_id: str) -> str | None:
        if profile_id not in self._canonical:
            self._canonical[profile_id] = self._follow_merges(profile_id)
        return self._canonical[profile_id]

    def _follow_merges(self, profile_id: str) -> str | None:
        current: str | None = profile_id
        while current is not None:
            row = self._execute(
                "SELECT merged_into FROM profiles WHERE id = ?", (current,)
            ).fetchone()
            if row is None:
                return None
            if row[0] is None:
                return current
            current = row[0]
        return None

    def created_at(self, profile_id: str) -> float:
        created: float = self._one("SELECT created_at FROM profiles WHERE id = ?", (profile_id,))
        return created

    def scope_of(self, profile_id: str) -> str:
        scope: str = self._one("SELECT scope FROM profiles WHERE id = ?", (profile_id,))
        return scope

    def create_profile(self, profile_id: str, scope: str, at: float) -> None:
        row = (profile_id, scope, at)
        if self._deferred:
            self._new_profiles.append(row)
        else:
            self._execute(INSERT_PROFILE, row)
        self._canonical[profile_id] = profile_id

    def attach(self, scope: str, identity: Identity, profile_id: str) -> None:
        key = (scope, identity.kind, identity.value)
        if self._deferred:
            self._new_identities.append((*key, profile_id))
        else:
            self._execute(INSERT_IDENTITY, (*key, profile_id))
        self._owners[key] = profile_id

    def merge(self, survivor: str, merged: str) -> None:
        self._execute(
            "UPDATE identities SET profile_id = ? WHERE profile_id = ?", (survivor, merged)
        )
        self._execute("UPDATE sessions SET profile_id = ? WHERE profile_id = ?", (survivor, merged))
        gone = ujson.loads(self._one("SELECT traits FROM profiles WHERE id = ?", (merged,)))
        kept = ujson.loads(self._one("SELECT traits FROM profiles WHERE id = ?", (survivor,)))
        self._write_traits(survivor, traits_union(gone, kept))
        self._execute("UPDATE profiles SET merged_into = ? WHERE id = ?", (survivor, merged))
        # As the UPDATEs above did: the merged profile's identities now name the survivor,
        # and whatever led to the merged profile now leads on to the survivor.
        for key, owner in self._owners.items():
            if owner == merged:
                self._owners[key] = survivor
        self._canonical.clear()

    def update_traits(self, profile_id: str, traits: dict[str, object]) -> None:
        current = ujson.loads(self._one("SELECT traits FROM profiles WHERE id = ?", (profile_id,)))
        self._write_traits(profile_id, traits_union(current, traits))

    def _write_traits(self, profile_id: str, encoded: str | None) -> None:
        if encoded is not None:  # None: over the bound, the profile keeps its traits
            self._execute("UPDATE profiles SET traits = ? WHERE id = ?", (encoded, profile_id))

    def latest_session(self, profile_id: str) -> tuple[str, float] | None:
        row = self._execute(
            "SELECT id, last_seen FROM sessions WHERE profile_id = ?"
            " ORDER BY last_seen DESC, id DESC LIMIT 1",
            (profile_id,),
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def session_owner(self, session_id: str) -> str | None:
        owner: str | None = self._one("SELECT profile_id FROM sessions WHERE id = ?", (session_id,))
        return owner

    def start_session(self, session_id: str, profile_id: str, at: float) -> None:
        self._execute(
            "INSERT INTO sessions (id, profile_id, started_at, last_seen) VALUES (?, ?, ?, ?)",
            (session_id, profile_id, at, at),
        )

    def touch_session(self, session_id: str, at: float) -> None:
        self._execute(
            "UPDATE sessions SET last_seen = max(last_seen, ?) WHERE id = ?", (at, session_id)
        )
