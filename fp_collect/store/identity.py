"""Identity resolution, written once for every backend.

A backend exposes the few primitives of :class:`IdentityGraph`, bound to the
transaction in which it writes the event; :func:`resolve_profile` and
:func:`resolve_session` decide with them. Running inside that transaction is what
makes two concurrent first events of one visitor end up on one profile.
"""

from __future__ import annotations

import os
import time
from typing import Protocol

from fp_collect.decoding import dumps
from fp_collect.store.base import (
    STORED,
    UNKNOWN_USER,
    EventRecord,
    Identity,
    IdentityOp,
    Outcome,
    SessionOp,
)


class IdentityGraph(Protocol):
    def owner(self, scope: str, identity: Identity) -> str | None:
        """The profile owning ``identity``, as stored (possibly merged away since)."""

    def canonical(self, profile_id: str) -> str | None:
        """The surviving profile for ``profile_id`` (following merges), None if unknown."""

    def created_at(self, profile_id: str) -> float: ...

    def scope_of(self, profile_id: str) -> str:
        """The workspace of a profile that exists."""

    def create_profile(self, profile_id: str, scope: str, at: float) -> None: ...

    def attach(self, scope: str, identity: Identity, profile_id: str) -> None: ...

    def merge(self, survivor: str, merged: str) -> None:
        """Move ``merged``'s identities and sessions to ``survivor``, mark it merged, and
        fold its traits under the survivor's (:func:`traits_union`)."""

    def update_traits(self, profile_id: str, traits: dict[str, object]) -> None:
        """Merge ``traits`` into the profile's, theirs winning (:func:`traits_union`)."""

    def latest_session(self, profile_id: str) -> tuple[str, float] | None:
        """The profile's most recently active session: (id, last seen)."""

    def session_owner(self, session_id: str) -> str | None: ...

    def start_session(self, session_id: str, profile_id: str, at: float) -> None: ...

    def touch_session(self, session_id: str, at: float) -> None: ...


# The longest address SMTP allows; a longer "email" is kept as a trait, not an identity.
MAX_EMAIL_LENGTH = 254
# A profile's traits are read and written whole by every identify of it: bounded, so that
# nobody holding the (public) write key can make one huge and each identify of it slow.
MAX_PROFILE_TRAITS = 64 * 1024


def email_identity(value: object) -> Identity | None:
    """An email as an identity, compared case-insensitively; None if it is not one."""
    if isinstance(value, str) and "@" in value and len(value) <= MAX_EMAIL_LENGTH:
        return Identity("email", value.strip().lower())
    return None


# The newest timestamp new_id() used: its ids never go back in time within a process.
_last_ms = 0


def new_id(prefix: str) -> str:
    """``prefix`` + 30 upper-case hex digits, the seeds' ID form (``PR`` + 30 characters
    for profiles): 12 digits of a millisecond timestamp, then 18 (72 bits) random.

    Time first, as in a ULID, so that new ids sort after older ones: the indexes keyed
    by them (profiles, identities by profile, sessions, events by profile) grow at their
    end, where one page takes a whole group of new visitors, instead of each new id
    dirtying a page of its own somewhere in the middle. The random part is drawn afresh
    for every id, never incremented as a monotonic ULID's is within a millisecond: a
    client is given its profile id and may name it in later calls, so the next visitor's
    id must not be guessable from one's own. If the clock steps back, ids keep the last
    timestamp until it catches up (a race between threads here only repeats a value).
    """
    global _last_ms
    now = time.time_ns() // 1_000_000
    if now > _last_ms:
        _last_ms = now
    else:
        now = _last_ms
    return f"{prefix}{now:012X}{os.urandom(9).hex().upper()}"


def resolve_event(graph: IdentityGraph, event: EventRecord) -> Outcome:
    """Who ``event`` belongs to, as the outcome of storing it: its profile and session
    (resolved, created or merged in ``graph``), none when it names nobody, or
    UNKNOWN_USER when its profile had to exist and does not."""
    if event.identity is None:
        return STORED
    profile_id = resolve_profile(graph, event.identity)
    if profile_id is None:
        return UNKNOWN_USER
    session_id = None
    if event.session is not None:
        session_id = resolve_session(graph, event.session, profile_id)
    return Outcome(True, None, profile_id, session_id)


def resolve_profile(graph: IdentityGraph, op: IdentityOp) -> str | None:
    """The profile the event belongs to, created or merged as ``op`` says; None when the
    profile must already exist and does not."""
    survivors = _survivors(graph, op)
    profile = None if op.profile_id is None else survivors[op.profile_id]
    foreign = profile is not None and graph.scope_of(profile) != op.scope
    if foreign:
        # Another workspace's profile is not this event's to name (ids are public, and a
        # Firstparty client may choose its own): resolved as if no id were given.
        profile = None
    elif profile is None and op.profile_id is not None and (op.create or not op.lookups):
        if not op.create:
            return None
        graph.create_profile(op.profile_id, op.scope, op.at)
        profile = op.profile_id
    if profile is not None:
        owners = _owners(graph, op, survivors)
        if op.merge and any(other != profile for other in owners):
            # As without an explicit profile: the oldest survives (a login that finds
            # the email on a known profile moves onto it, as the seed describes).
            joined = [profile, *(other for other in owners if other != profile)]
            survivor = min(joined, key=lambda p: (graph.created_at(p), p))
            for other in joined:
                if other != survivor:
                    graph.merge(survivor, other)
            profile = survivor
    else:
        owners = _owners(graph, op, survivors)
        if not owners:
            if not op.create:
                return None
            profile = op.new_profile_id or new_id("PR")
            graph.create_profile(profile, op.scope, op.at)
        elif op.merge and len(owners) > 1:
            profile = min(owners, key=lambda p: (graph.created_at(p), p))
            for other in owners:
                if other != profile:
                    graph.merge(profile, other)
        else:
            profile = owners[0]
    for identity in op.identities:
        if graph.owner(op.scope, identity) is None:
            graph.attach(op.scope, identity, profile)
    if op.traits:
        graph.update_traits(profile, op.traits)
    return profile


def resolve_session(graph: IdentityGraph, op: SessionOp, profile: str) -> str:
    """The session the event joins: named, current (active within the timeout), or new."""
    if op.session_id is not None:
        if graph.session_owner(op.session_id) is None:
            graph.start_session(op.session_id, profile, op.at)
        else:
            graph.touch_session(op.session_id, op.at)
        return op.session_id
    latest = graph.latest_session(profile)
    if latest is not None and op.at - latest[1] < op.timeout:
        graph.touch_session(latest[0], op.at)
        return latest[0]
    session = op.new_session_id or new_id("SE")
    graph.start_session(session, profile, op.at)
    return session


def _survivors(graph: IdentityGraph, op: IdentityOp) -> dict[str, str | None]:
    """Every profile the op names, outright or as an identity's owner, with the surviving
    profile it leads to (None: there is no such profile).

    Followed in one order, sorted, whatever the op's: following a profile locks it where
    the store locks rows (PostgreSQL), in the order the set-wise path locks them too, and
    two writers locking the same two profiles in opposite orders would deadlock (as
    ``track(u1, a1)`` and ``track(u2, a2)`` did, when u1 and a2 are one person and u2 and
    a1 another). A merged profile's survivor is locked when it is reached, out of that
    order: a deadlock it causes is rarer, and is retried.
    """
    named = {
        owner
        for identity in (*op.identities, *op.lookups)
        if (owner := graph.owner(op.scope, identity)) is not None
    }
    if op.profile_id is not None:
        named.add(op.profile_id)
    return {profile_id: graph.canonical(profile_id) for profile_id in sorted(named)}


def _owners(graph: IdentityGraph, op: IdentityOp, survivors: dict[str, str | None]) -> list[str]:
    """Distinct surviving profiles of the op's identities, in the op's order."""
    found: list[str] = []
    for identity in (*op.identities, *op.lookups):
        owner = graph.owner(op.scope, identity)
        profile = survivors.get(owner) if owner is not None else None
        if profile is not None and profile not in found:
            found.append(profile)
    return found


def traits_union(base: dict[str, object], winning: dict[str, object]) -> str | None:
    """The encoding of ``base`` updated by ``winning`` (whose keys win), as a profile
    stores its traits; None when that would take more than :data:`MAX_PROFILE_TRAITS`
    characters: the profile then keeps the traits it has. Every backend merges traits
    through this one function, so all agree on where the bound falls."""
    text = dumps({**base, **winning})
    return text if len(text) <= MAX_PROFILE_TRAITS else None
