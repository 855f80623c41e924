"""A whole group of batches in a few set-wise round trips: the writer's common path.

Done batch at a time, each event costs about six statements, each a round trip
(is it stored? who owns its identity? lock the profile; the claim; the insert...).
Here the group's questions are asked at once, in one pipeline: which of its claims
are held (rows locked), which profiles its identities lead to (rows locked, in id
order), who owns those identities, which of its message ids are stored, and the
profiles' latest sessions. The locks come first: each statement sees what was
committed before it began, so what is looked up after them includes all that the
writers we waited for did. Every batch is then decided in Python, in order, as the
batch-at-a-time path would decide it; and what was decided is written with one
statement per table, in a second pipeline.

What other writers do between the lookups and the writes cannot change a decision
unseen:

* a profile or claim row found is locked until the group commits;
* a message id stored meanwhile makes the events' INSERT insert fewer rows than
  decided, a claim taken meanwhile the claims' INSERT; and an identity attached, or a
  named session started, meanwhile fails its INSERT on the key;
* what the group took as absent and did not write itself (a refused event's message,
  an identity nobody owned) is asked again at write time, all locks held.

Any such surprise raises :class:`GroupRaced`. Any failure at all makes the caller roll
the group back and redo it batch at a time, where a race is retried and a bad batch
fails alone: this path only ever commits a group it wrote whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg.types.json import Json

from fp_collect.decoding import dumps
from fp_collect.store.base import (
    DUPLICATE,
    Batch,
    EventRecord,
    Identity,
    Outcome,
    refused_records,
)
from fp_collect.store.decide import decide
from fp_collect.store.postgres.graph import PGGraph
from fp_collect.store.postgres.sql import Connection, Cursor
from fp_collect.store.postgres.text import json_rows
from fp_collect.store.postgres.watchdog import Watch

Statement = tuple[str, Sequence[object]]
_ClaimKey = tuple[str, str, str]
_IdentityKey = tuple[str, str, str]


class GroupRaced(Exception):
    """Another transaction wrote what this group had decided on: redo it batch at a time."""


class Link:
    """The writer's connection inside one transaction, each statement watched."""

    def __init__(self, conn: Connection, watch: Watch) -> None:
        self.conn = conn
        self.watch = watch

    def run(self, sql: str, params: Sequence[object] = ()) -> Cursor:
        self.watch.extend()
        return self.conn.execute(sql, params)

    def pipeline(self, statements: Sequence[Statement]) -> list[Cursor]:
        """Send ``statements`` at once and wait for all their results: one round trip.
        An error in any of them is raised here (the rest are then not run)."""
        cursors: list[Cursor] = []
        if not statements:
            return cursors
        self.watch.extend(len(statements))  # the server has the timeout for each
        with self.conn.pipeline():
            for sql, params in statements:
                cursor = self.conn.cursor()
                cursor.execute(sql, params)
                cursors.append(cursor)
        return cursors


def write_group(link: Link, sql: dict[str, str], batches: Sequence[Batch]) -> list[list[Outcome]]:
    """Decide and write ``batches`` in the open transaction; their outcomes, in order.

    Raises :class:`GroupRaced` (or any other error): the transaction must then be
    rolled back, and nothing of it may be committed.
    """
    lookups = _Lookups.of(batches)
    known, graph = _look_up(link, sql, lookups)
    rows = _Rows()
    results = [_decide(batch, known, graph, rows) for batch in batches]
    statements = _still_true(sql, batches, results, graph) + graph.pending()
    statements += rows.statements(sql)
    cursors = link.pipeline([statement for statement, _ in statements])
    for cursor, (_, expected) in zip(cursors, statements, strict=True):
        if expected is not None and len(cursor.fetchall()) != expected:
            raise GroupRaced("another writer changed what the group was decided on")
    return results


def _still_true(
    sql: dict[str, str],
    batches: Sequence[Batch],
    results: Sequence[Sequence[Outcome]],
    graph: _GroupGraph,
) -> list[_Checked]:
    """Statements that find nothing if what the group took as absent still is: the
    messages it refused for another reason than being stored, and the identities it
    relied on nobody owning (and did not attach itself).

    The lookups ran after their locks, but deciding may wait for more (a profile merged
    into one not locked yet, the rows a merge moves); a writer waited for there may
    have stored such a message or attached such an identity, and batch at a time the
    statements after the wait would have seen it. Stored messages and owners only ever
    appear, so asking again at the end, every lock held, is enough. Sent ahead of the
    writes, so that they do not see the group's own rows.
    """
    refused = sorted(
        {
            (event.source_id, event.message_id)
            for batch, outcomes in zip(batches, results, strict=True)
            for event, outcome in zip(batch.events, outcomes, strict=True)
            if not outcome.stored and outcome.reason != DUPLICATE.reason
        }
    )
    unowned = graph.relied_on_unowned()
    statements: list[_Checked] = []
    if refused:
        statements.append(((sql["stored_among"], (json_rows(refused),)), 0))
    if unowned:
        statements.append(((sql["owners_among"], (json_rows(unowned),)), 0))
    return statements


@dataclass(slots=True)
class _Lookups:
    """Everything a group's events will ask about, deduplicated and sorted (neighbours
    in an index, and locks taken in one order by every writer)."""

    messages: list[tuple[str, str]]
    claims: list[_ClaimKey]
    identities: list[_IdentityKey]
    profiles: list[str]
    sessions: bool

    @classmethod
    def of(cls, batches: Iterable[Batch]) -> _Lookups:
        messages: set[tuple[str, str]] = set()
        claims: set[_ClaimKey] = set()
        identities: set[_IdentityKey] = set()
        profiles: set[str] = set()
        sessions = False
        for batch in batches:
            for event in batch.events:
                messages.add((event.source_id, event.message_id))
                for claim in event.claims:
                    claims.add((event.source_id, claim.kind, claim.key))
                op = event.identity
                if op is not None:
                    for identity in (*op.identities, *op.lookups):
                        identities.add((op.scope, identity.kind, identity.value))
                    if op.profile_id is not None:
                        profiles.add(op.profile_id)
                    sessions = sessions or event.session is not None
        return cls(sorted(messages), sorted(claims), sorted(identities), sorted(profiles), sessions)


@dataclass(slots=True)
class _Known:
    """What the lookups found, kept current while the group is decided: the (source,
    message id) stored, and the ``until`` of each claim held (absent: never taken)."""

    stored: set[tuple[str, str]]
    claims: dict[_ClaimKey, float | None]
    # The claims that had a row when looked up (locked): renewed, not inserted.
    claim_rows: frozenset[_ClaimKey]


def lock_statements(sql: dict[str, str], lookups: _Lookups) -> list[Statement]:
    """Lock the claims the events make and the profiles they name (outright or by an
    identity's owner) that exist: claims first, each kind in key order. Every writer
    that locks more than one event's rows locks them so, never crosswise: two that
    did would wait for each other (a deadlock, which costs a second and a retry)."""
    statements: list[Statement] = []
    if lookups.claims:
        statements.append((sql["lock_claims_among"], (json_rows(lookups.claims),)))
    if lookups.identities or lookups.profiles:
        statements.append((sql["lock_profiles_among"], _profiles_among(lookups)))
    return statements


def lock_in_order(link: Link, sql: dict[str, str], batches: Iterable[Batch]) -> None:
    """Take :func:`lock_statements`' locks for ``batches``, in one round trip (for the
    batch-at-a-time path, before its events lock one at a time)."""
    for cursor in link.pipeline(lock_statements(sql, _Lookups.of(batches))):
        cursor.fetchall()


def _profiles_among(lookups: _Lookups) -> tuple[Json, Json]:
    profiles = json_rows([(profile_id,) for profile_id in lookups.profiles])
    return profiles, json_rows(lookups.identities)


def _look_up(link: Link, sql: dict[str, str], lookups: _Lookups) -> tuple[_Known, _GroupGraph]:
    identities = json_rows(lookups.identities)
    profiles_among = _profiles_among(lookups)
    # Locks first: a statement sees what was committed before it began, so the lookups
    # after the locks see all that the writers we waited for did (a message one of
    # them stored while we waited for its claim is a duplicate, as batch at a time).
    statements = lock_statements(sql, lookups)
    if lookups.identities:
        statements.append((sql["owners_among"], (identities,)))
    if lookups.messages:
        statements.append((sql["stored_among"], (json_rows(lookups.messages),)))
    if lookups.sessions and (lookups.identities or lookups.profiles):
        statements.append((sql["latest_sessions_among"], profiles_among))
    cursors = iter(link.pipeline(statements))
    held: dict[_ClaimKey, float | None] = {}
    if lookups.claims:
        held = {(source, kind, key): until for source, kind, key, until in next(cursors)}
    graph = _GroupGraph(link, sql)
    if lookups.identities or lookups.profiles:
        for profile_id, merged_into in next(cursors):
            if merged_into is None:
                graph.canonicals[profile_id] = profile_id
    if lookups.identities:
        owners = {(scope, kind, value): owner for scope, kind, value, owner in next(cursors)}
        for key in lookups.identities:
            graph.owners[key] = owners.get(key)
    stored: set[tuple[str, str]] = set()
    if lookups.messages:
        stored = {(source_id, message_id) for source_id, message_id in next(cursors)}
    if lookups.sessions and (lookups.identities or lookups.profiles):
        found = {profile_id: (session, seen) for profile_id, session, seen in next(cursors)}
        # Only the profiles locked above: no other writer can change their sessions.
        for profile_id in graph.canonicals:
            graph.remember_latest(profile_id, found.get(profile_id))
    return _Known(stored, held, frozenset(held)), graph


def _decide(batch: Batch, known: _Known, graph: _GroupGraph, rows: _Rows) -> list[Outcome]:
    """The batch-at-a-time path's decisions for ``batch``, in the same order, from what
    is ``known``; what is to be written goes to ``rows`` (and the graph)."""
    outcomes = []
    for event in batch.events:
        outcome = decide(event, known.stored, known.claims, graph)
        if outcome.stored:
            rows.events.append(event_row(event, outcome.profile_id, outcome.session_id))
            for claim in event.claims:
                key = (event.source_id, claim.kind, claim.key)
                taken = rows.renewed_claims if key in known.claim_rows else rows.new_claims
                taken[key] = claim.until
        outcomes.append(outcome)
    for r in (*refused_records(batch, outcomes), *batch.rejections):
        rows.rejections.append(
            (r.source_id, r.reason, r.message, r.received_at, r.endpoint, r.payload, r.index,
             r.message_id)
        )  # fmt: skip
    return outcomes


# A statement to send, and how many rows it must return (None: not checked).
_Checked = tuple[Statement, "int | None"]


@dataclass(slots=True)
class _Rows:
    """The group's events, claims and rejections, each written with one statement."""

    events: list[tuple[object, ...]] = field(default_factory=list)
    new_claims: dict[_ClaimKey, float | None] = field(default_factory=dict)
    renewed_claims: dict[_ClaimKey, float | None] = field(default_factory=dict)
    rejections: list[tuple[object, ...]] = field(default_factory=list)

    def statements(self, sql: dict[str, str]) -> list[_Checked]:
        statements: list[_Checked] = []
        if self.new_claims:
            claims = [(*key, until) for key, until in self.new_claims.items()]
            statements.append(((sql["insert_claims"], (json_rows(claims),)), len(claims)))
        if self.renewed_claims:
            claims = [(*key, until) for key, until in self.renewed_claims.items()]
            statements.append(((sql["renew_claims"], (json_rows(claims),)), None))
        if self.events:
            statements.append(((sql["insert_events"], (json_rows(self.events),)), len(self.events)))
        if self.rejections:
            statements.append(((sql["insert_rejections"], (json_rows(self.rejections),)), None))
        return statements


def event_row(
    event: EventRecord, profile_id: str | None, session_id: str | None
) -> tuple[object, ...]:
    return (
        event.source_id, event.message_id, event.type, event.name, event.user_id,
        event.anonymous_id, event.timestamp, event.received_at, event.payload, profile_id,
        session_id, dumps(list(event.warnings)) if event.warnings else None,
    )  # fmt: skip


class _GroupGraph(PGGraph):
    """The identity primitives over the group's lookups, inside its transaction.

    What the lookups found is remembered and kept current by our own changes: the owner
    of every identity the group names, the profiles found unmerged (locked), and their
    latest sessions. New profiles and identities, and sessions started or seen again,
    are kept back and written in one statement each: by :meth:`pending` with the rest
    of the group, or before any other statement of the graph, so that every query sees
    them. Anything not remembered is asked with a statement of its own, as the
    batch-at-a-time path's graph asks it (merges, traits, named sessions).
    """

    def __init__(self, link: Link, sql: dict[str, str]) -> None:
        super().__init__(link.run, sql, lock=True)
        self._link = link
        # Profile -> the surviving profile it leads to, locked by this transaction.
        self.canonicals: dict[str, str] = {}
        # Each locked profile's latest session (id, last seen), None when it has none;
        # and whose profile each session seen is (those remembered, named, or new).
        self.latest: dict[str, tuple[str, float] | None] = {}
        self._session_profiles: dict[str, str] = {}
        self._new_profiles: list[tuple[str, str, float]] = []
        self._new_identities: list[tuple[str, str, str, str]] = []
        # Sessions started here: id -> [profile, started at, last seen]; inserted, so a
        # named session another writer started meanwhile fails on its key.
        self._new_sessions: dict[str, list[Any]] = {}
        # Stored sessions seen again: id -> [profile, last seen].
        self._touched: dict[str, list[Any]] = {}
        # The identities whose owner resolution asked for.
        self._asked: set[_IdentityKey] = set()

    def pending(self) -> list[_Checked]:
        """The statements writing what was kept back (and forgetting it here)."""
        statements: list[_Checked] = []
        for name, rows in (
            ("insert_profiles", self._new_profiles),
            ("insert_identities", self._new_identities),
        ):
            if rows:
                statements.append(((self._sql[name], (json_rows(rows),)), None))
                rows.clear()
        for name, sessions in (
            ("insert_sessions", self._new_sessions),
            ("touch_sessions", self._touched),
        ):
            if sessions:
                rows = [(session_id, *row) for session_id, row in sessions.items()]
                statements.append(((self._sql[name], (json_rows(rows),)), None))
                sessions.clear()
        return statements

    def _execute(self, name: str, params: tuple[object, ...]) -> Cursor:
        self._link.pipeline([statement for statement, _ in self.pending()])
        return super()._execute(name, params)

    def owner(self, scope: str, identity: Identity) -> str | None:
        owner = super().owner(scope, identity)
        self._asked.add((scope, identity.kind, identity.value))
        return owner

    def relied_on_unowned(self) -> list[_IdentityKey]:
        """The identities resolution asked about that nobody owns, as far as the group
        knows (it attached none of them)."""
        return sorted(key for key in self._asked if self.owners[key] is None)

    def canonical(self, profile_id: str) -> str | None:
        if profile_id not in self.canonicals:
            canonical = super().canonical(profile_id)  # locked now
            if canonical is None:
                return None
            self.canonicals[profile_id] = self.canonicals[canonical] = canonical
        return self.canonicals[profile_id]

    def create_profile(self, profile_id: str, scope: str, at: float) -> None:
        self._new_profiles.append((profile_id, scope, at))
        self.canonicals[profile_id] = profile_id
        self.latest[profile_id] = None

    def attach(self, scope: str, identity: Identity, profile_id: str) -> None:
        key = (scope, identity.kind, identity.value)
        self._new_identities.append((*key, profile_id))
        self.owners[key] = profile_id

    def merge(self, survivor: str, merged: str) -> None:
        super().merge(survivor, merged)
        # As the UPDATEs did: what led to the merged profile now leads to the survivor,
        # whose latest session may now be one of the merged profile's.
        for profile_id, canonical in self.canonicals.items():
            if canonical == merged:
                self.canonicals[profile_id] = survivor
        for session_id, owner in self._session_profiles.items():
            if owner == merged:
                self._session_profiles[session_id] = survivor
        self.latest.pop(survivor, None)
        self.latest.pop(merged, None)

    def latest_session(self, profile_id: str) -> tuple[str, float] | None:
        if profile_id not in self.latest:
            self.remember_latest(profile_id, super().latest_session(profile_id))
        return self.latest[profile_id]

    def remember_latest(self, profile_id: str, latest: tuple[str, float] | None) -> None:
        self.latest[profile_id] = latest
        if latest is not None:
            self._session_profiles[latest[0]] = profile_id

    def session_owner(self, session_id: str) -> str | None:
        owner = super().session_owner(session_id)
        if owner is not None:
            self._session_profiles[session_id] = owner
        return owner

    def start_session(self, session_id: str, profile_id: str, at: float) -> None:
        if session_id in self._new_sessions:
            # A caller offered one new id twice: batch at a time fails it on the key.
            raise GroupRaced(f"session {session_id!r} started twice in one group")
        self._new_sessions[session_id] = [profile_id, at, at]
        self._session_profiles[session_id] = profile_id
        self._seen(profile_id, session_id, at)

    def touch_session(self, session_id: str, at: float) -> None:
        profile_id = self._session_profiles.get(session_id)
        if profile_id is None:
            # Never seen here (resolve_session touches only sessions it found), and its
            # profile is needed to write the touch as an upsert: give up this path.
            raise GroupRaced(f"session {session_id!r} touched before it was looked up")
        if session_id in self._new_sessions:
            row = self._new_sessions[session_id]
            row[2] = max(row[2], at)
        else:
            row = self._touched.setdefault(session_id, [profile_id, at])
            row[1] = max(row[1], at)
        self._seen(profile_id, session_id, at)

    def _seen(self, profile_id: str, session_id: str, at: float) -> None:
        """Keep the latest session of ``profile_id`` (if remembered) current after
        ``session_id`` of that profile was last seen at ``at`` or later."""
        if profile_id not in self.latest:
            return
        latest = self.latest[profile_id]
        if latest is not None and latest[0] == session_id:
            self.latest[profile_id] = (session_id, max(latest[1], at))
        # The latest is the one last seen last (the greater id on a tie). A touched
        # session that was not the latest was last seen before it until now.
        elif latest is None or (at, session_id) > (latest[1], latest[0]):
            self.latest[profile_id] = (session_id, at)
