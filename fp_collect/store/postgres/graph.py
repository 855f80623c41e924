"""The identity graph's primitives in SQL, over which
:func:`~fp_collect.store.identity.resolve_profile` runs.
"""

from __future__ import annotations

from typing import Any

import ujson

from fp_collect.store.base import Identity
from fp_collect.store.identity import traits_union
from fp_collect.store.postgres.sql import Cursor, Run


class PGGraph:
    """The identity primitives over the writer's transaction (or a read's).

    With ``lock``, following a profile locks its row until the transaction ends, which
    is what serialises concurrent events, merges and sessions of one person.

    One graph serves one event. The owner of each identity is asked once: resolution
    asks again before attaching, and an identity attached by another writer meanwhile
    fails our attach on its key whether or not we asked twice (the batch is redone).
    Every statement goes through :meth:`_execute` (the group's graph writes some rows
    late, and must write them before anything else is asked).
    """

    def __init__(self, run: Run, sql: dict[str, str], *, lock: bool) -> None:
        self._run = run
        self._sql = sql
        self._merged_into = "merged_into_locked" if lock else "merged_into"
        self.owners: dict[tuple[str, str, str], str | None] = {}

    def _execute(self, name: str, params: tuple[object, ...]) -> Cursor:
        return self._run(self._sql[name], params)

    def _one(self, name: str, params: tuple[object, ...]) -> Any:
        row = self._execute(name, params).fetchone()
        return None if row is None else row[0]

    def owner(self, scope: str, identity: Identity) -> str | None:
        key = (scope, identity.kind, identity.value)
        if key not in self.owners:
            self.owners[key] = self._one("owner", key)
        return self.owners[key]

    def canonical(self, profile_id: str) -> str | None:
        current = profile_id
        for _ in range(1000):  # merge chains are short; a cycle would be a bug
            row = self._execute(self._merged_into, (current,)).fetchone()
            if row is None:
                return None
            if row[0] is None:
                return current
            current = row[0]
        raise RuntimeError(f"profile {profile_id!r}: merge chain too long")

    def created_at(self, profile_id: str) -> float:
        created: float = self._one("created_at", (profile_id,))
        return created

    def scope_of(self, profile_id: str) -> str:
        scope: str = self._one("profile_scope", (profile_id,))
        return scope

    def create_profile(self, profile_id: str, scope: str, at: float) -> None:
        self._execute("create_profile", (profile_id, scope, at))

    def attach(self, scope: str, identity: Identity, profile_id: str) -> None:
        self._execute("attach", (scope, identity.kind, identity.value, profile_id))
        self.owners[(scope, identity.kind, identity.value)] = profile_id

    def merge(self, survivor: str, merged: str) -> None:
        self._execute("move_identities", (survivor, merged))
        self._execute("move_sessions", (survivor, merged))
        gone = ujson.loads(self._one("traits", (merged,)))
        kept = ujson.loads(self._one("traits", (survivor,)))
        self._set_traits(survivor, traits_union(gone, kept))
        self._execute("mark_merged", (survivor, merged))
        for key, owner in self.owners.items():  # as move_identities did
            if owner == merged:
                self.owners[key] = survivor

    def update_traits(self, profile_id: str, traits: dict[str, object]) -> None:
        current = ujson.loads(self._one("traits", (profile_id,)))
        self._set_traits(profile_id, traits_union(current, traits))

    def _set_traits(self, profile_id: str, encoded: str | None) -> None:
        if encoded is not None:  # None: over the bound, the profile keeps its traits
            self._execute("set_traits", (encoded, profile_id))

    def latest_session(self, profile_id: str) -> tuple[str, float] | None:
        row = self._execute("latest_session", (profile_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def session_owner(self, session_id: str) -> str | None:
        owner: str | None = self._one("session_owner", (session_id,))
        return owner

    def start_session(self, session_id: str, profile_id: str, at: float) -> None:
        self._execute("start_session", (session_id, profile_id, at, at))

    def touch_session(self, session_id: str, at: float) -> None:
        self._execute("touch_session", (at, session_id))
