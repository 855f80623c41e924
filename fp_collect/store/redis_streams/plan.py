"""Planning a group's batches against values read from Redis: what each batch will
write, and what must still hold when its script runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

import redis
import ujson

from fp_collect.decoding import dumps
from fp_collect.errors import StoreUnavailable
from fp_collect.store.base import Batch, Commit, EventRecord, Identity, Outcome, RejectionRecord
from fp_collect.store.identity import traits_union
from fp_collect.store.redis_streams.keys import (
    Cell,
    Check,
    Keys,
    Write,
    identity_field,
    identity_member,
)
from fp_collect.store.redis_streams.rows import text_or_none


@dataclass(slots=True)
class Collection:
    """Planned changes to a set or sorted set: emptied first (``cleared``), then ``added``
    (member -> score; "" for a set)."""

    cleared: bool = False
    added: dict[str, str] = field(default_factory=dict)

    def apply(self, later: Collection) -> None:
        if later.cleared:
            self.cleared, self.added = True, dict(later.added)
        else:
            self.added.update(later.added)


class Round:
    """One attempt at committing a group: values read from Redis, and the writes that
    the batches planned so far will have made by the time the next one's script runs."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._cache: dict[Cell, str | None] = {}
        self._members: dict[str, list[str]] = {}
        self._tops: dict[str, str | None] = {}
        self.cells: dict[Cell, str | None] = {}
        self.collections: dict[str, Collection] = {}
        # Sets of profiles created this round: empty in Redis, no need to ask.
        self.fresh: set[str] = set()

    def prefetch(self, cells: Iterable[Cell], tops: Iterable[str] = ()) -> None:
        """Read many values in one round trip, before they are asked for."""
        wanted = [c for c in dict.fromkeys(cells) if c not in self._cache and c not in self.cells]
        top_keys = [k for k in dict.fromkeys(tops) if k not in self._tops]
        if not wanted and not top_keys:
            return
        pipe = self._client.pipeline(transaction=False)
        for kind, key, name in wanted:
            if kind == "g":
                pipe.get(key)
            else:
                pipe.hget(key, name)
        for key in top_keys:
            pipe.zrevrange(key, 0, 0)
        replies = pipe.execute()
        for cell, value in zip(wanted, replies, strict=False):
            self._cache[cell] = text_or_none(value)
        for key, value in zip(top_keys, replies[len(wanted) :], strict=True):
            self._tops[key] = text_or_none(value[0]) if value else None

    def value(self, cell: Cell) -> str | None:
        if cell in self.cells:
            return self.cells[cell]
        if cell not in self._cache:
            self.prefetch([cell])
        return self._cache[cell]

    def members(self, key: str, sorted_set: bool) -> list[str]:
        """The members of a (sorted) set as the next script will find it."""
        planned = self.collections.get(key)
        found: list[str] = []
        if (planned is None or not planned.cleared) and key not in self.fresh:
            if key not in self._members:
                reply = (
                    self._client.zrange(key, 0, -1) if sorted_set else self._client.smembers(key)
                )
                self._members[key] = sorted(cast(Iterable[str], reply))
            found = self._members[key]
        return list(dict.fromkeys([*found, *(planned.added if planned else ())]))

    def top_candidates(self, key: str) -> list[str]:
        """The members that may score highest in a sorted set: Redis' top one (unless the
        set is to be emptied) and those planned to be added."""
        planned = self.collections.get(key)
        candidates: list[str] = []
        if (planned is None or not planned.cleared) and key not in self.fresh:
            if key not in self._tops:
                self.prefetch((), [key])
            top = self._tops[key]
            if top is not None:
                candidates.append(top)
        return list(dict.fromkeys([*candidates, *(planned.added if planned else ())]))

    def absorb(self, tx: Tx) -> None:
        """A batch is planned: the next ones see its writes."""
        self.cells.update(tx.cells)
        self.fresh |= tx.fresh
        for key, changes in tx.collections.items():
            self.collections.setdefault(key, Collection()).apply(changes)

    def seen(self, cell: Cell) -> bool:
        return cell in self._cache or cell in self.cells


class Tx:
    """One batch's plan: reads through the round (recording each as a check), and its own
    writes, which it reads back itself."""

    def __init__(self, round_: Round) -> None:
        self.round = round_
        self.cells: dict[Cell, str | None] = {}
        self.collections: dict[str, Collection] = {}
        self.checks: list[Check] = []
        self._checked: set[tuple[str, str, str]] = set()
        self.writes: list[Write] = []
        # Collections that cannot exist yet: their profile is created by this plan.
        self.fresh: set[str] = set()

    def _check(self, kind: str, key: str, name: str, expected: str | None) -> None:
        if (kind, key, name) not in self._checked:
            self._checked.add((kind, key, name))
            self.checks.append((kind, key, name, expected))

    def _before(self, cell: Cell) -> str | None:
        """The value as it stands before this batch's script, recorded as a check."""
        value = self.round.value(cell)
        self._check(*cell, value)
        return value

    def read(self, cell: Cell) -> str | None:
        if cell in self.cells:
            return self.cells[cell]
        return self._before(cell)

    def hget(self, key: str, name: str) -> str | None:
        return self.read(("h", key, name))

    def exists(self, key: str, name: str) -> bool:
        """Whether a hash field exists; only that is checked, not its value."""
        cell = ("h", key, name)
        if cell in self.cells:
            return self.cells[cell] is not None
        found = self.round.value(cell) is not None
        self._check("hx", key, name, "1" if found else "0")
        return found

    def absent(self, key: str, name: str) -> bool:
        """Whether a hash field does not exist yet. Unless it was already read, this costs
        no round trip: the script checks it, and a retry reads it (``PlannedJob.stale``)."""
        cell = ("h", key, name)
        if cell in self.cells or self.round.seen(cell):
            return self.read(cell) is None
        self._check("h", key, name, None)
        return True

    def members(self, key: str, sorted_set: bool) -> list[str]:
        before = [] if key in self.fresh else self.round.members(key, sorted_set)
        self._check("zc" if sorted_set else "sc", key, "", str(len(before)))
        for member in before:
            self._check("zm" if sorted_set else "sm", key, member, "1")
        own = self.collections.get(key)
        if own is None:
            return before
        return list(own.added) if own.cleared else list(dict.fromkeys([*before, *own.added]))

    def top(self, key: str, score: Callable[[str], Cell]) -> str | None:
        """The highest-scoring member of a sorted set, ties going to the greater member;
        ``score`` names the hash field that holds each member's score as well."""

        def rank_before(member: str) -> tuple[float, str]:
            return float(self._before(score(member)) or "-inf"), member

        def rank(member: str) -> tuple[float, str]:
            return float(self.read(score(member)) or "-inf"), member

        candidates = [] if key in self.fresh else self.round.top_candidates(key)
        before = max(candidates, key=rank_before, default=None)
        self._check("t", key, "", before)
        own = self.collections.get(key)
        candidates = [] if before is None or (own and own.cleared) else [before]
        if own is not None:
            candidates += own.added
        return max(dict.fromkeys(candidates), key=rank, default=None)

    def hset(self, key: str, name: str, value: str) -> None:
        self.cells[("h", key, name)] = value
        self.writes.append(("hset", (key,), (name, value)))

    def set(self, key: str, value: str, ttl_ms: int | None) -> None:
        self.cells[("g", key, "")] = value
        self.writes.append(("set", (key,), (value, "" if ttl_ms is None else str(ttl_ms))))

    def add(self, key: str, member: str, score: str = "") -> None:
        self.collections.setdefault(key, Collection()).added[member] = score
        if score:
            self.writes.append(("zadd", (key,), (score, member)))
        else:
            self.writes.append(("sadd", (key,), (member,)))

    def delete(self, key: str) -> None:
        self.collections[key] = Collection(cleared=True)
        self.writes.append(("del", (key,), ()))

    def append(self, keys: tuple[str, ...], args: tuple[str, ...], fields: list[str]) -> None:
        opcode = "event" if len(keys) == 3 else "rejection"
        self.writes.append((opcode, keys, (*args, str(len(fields) // 2), *fields)))

    def encode(self, maxlen: str) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of the script call."""
        index: dict[str, str] = {}

        def key(name: str) -> str:
            return index.setdefault(name, str(len(index) + 1))

        argv = [maxlen, str(len(self.checks))]
        for kind, name, part, expected in self.checks:
            argv += [kind, key(name), part, "" if expected is None else "=" + expected]
        argv.append(str(len(self.writes)))
        for opcode, keys, args in self.writes:
            argv += [opcode, *map(key, keys), *args]
        return list(index), argv


class Graph:
    """The identity primitives of :mod:`fp_collect.store.identity` over one batch's plan."""

    def __init__(self, tx: Tx, keys: Keys) -> None:
        self.tx = tx
        self.keys = keys

    def owner(self, scope: str, identity: Identity) -> str | None:
        return self.tx.hget(self.keys.identities(scope), identity_field(identity))

    def canonical(self, profile_id: str) -> str | None:
        current, seen = profile_id, set()
        while current not in seen:
            seen.add(current)
            key = self.keys.profile(current)
            if self.tx.hget(key, "created_at") is None:
                return None
            merged_into = self.tx.hget(key, "merged_into")
            if merged_into is None:
                return current
            current = merged_into
        raise StoreUnavailable(f"profile {profile_id!r} is merged in a cycle")

    def created_at(self, profile_id: str) -> float:
        return float(self.tx.hget(self.keys.profile(profile_id), "created_at") or "nan")

    def scope_of(self, profile_id: str) -> str:
        return str(self.tx.hget(self.keys.profile(profile_id), "scope") or "")

    def create_profile(self, profile_id: str, scope: str, at: float) -> None:
        key = self.keys.profile(profile_id)
        if not self.tx.absent(key, "created_at"):
            raise BatchFailed(f"profile {profile_id!r} exists already")
        self.tx.hset(key, "scope", scope)
        self.tx.hset(key, "created_at", repr(at))
        self.tx.hset(key, "traits", "{}")
        # Checked absent, so it owns nothing yet: its sets need no read. (Only a profile
        # that exists is given identities or sessions, and a merged one's sets are gone.)
        self.tx.fresh.add(self.keys.profile_identities(profile_id))
        self.tx.fresh.add(self.keys.profile_sessions(profile_id))

    def attach(self, scope: str, identity: Identity, profile_id: str) -> None:
        self.tx.hset(self.keys.identities(scope), identity_field(identity), profile_id)
        self.tx.add(self.keys.profile_identities(profile_id), identity_member(scope, identity))

    def merge(self, survivor: str, merged: str) -> None:
        gone = self.keys.profile_identities(merged)
        for member in self.tx.members(gone, sorted_set=False):
            scope, kind, value = json.loads(member)
            self.tx.hset(self.keys.identities(scope), f"{kind}:{value}", survivor)
            self.tx.add(self.keys.profile_identities(survivor), member)
        self.tx.delete(gone)
        sessions = self.keys.profile_sessions(merged)
        for session_id in self.tx.members(sessions, sorted_set=True):
            key = self.keys.session(session_id)
            last_seen = self.tx.hget(key, "last_seen") or "0"
            self.tx.hset(key, "profile_id", survivor)
            self.tx.add(self.keys.profile_sessions(survivor), session_id, last_seen)
        self.tx.delete(sessions)
        self._write_traits(survivor, traits_union(self._traits(merged), self._traits(survivor)))
        self.tx.hset(self.keys.profile(merged), "merged_into", survivor)

    def update_traits(self, profile_id: str, traits: dict[str, object]) -> None:
        self._write_traits(profile_id, traits_union(self._traits(profile_id), traits))

    def _traits(self, profile_id: str) -> dict[str, object]:
        text = self.tx.hget(self.keys.profile(profile_id), "traits")
        return cast(dict[str, object], ujson.loads(text or "{}"))

    def _write_traits(self, profile_id: str, encoded: str | None) -> None:
        if encoded is not None:  # None: over the bound, the profile keeps its traits
            self.tx.hset(self.keys.profile(profile_id), "traits", encoded)

    def latest_session(self, profile_id: str) -> tuple[str, float] | None:
        key = self.keys.profile_sessions(profile_id)
        top = self.tx.top(key, lambda s: ("h", self.keys.session(s), "last_seen"))
        if top is None:
            return None
        return top, float(self.tx.hget(self.keys.session(top), "last_seen") or "nan")

    def session_owner(self, session_id: str) -> str | None:
        return self.tx.hget(self.keys.session(session_id), "profile_id")

    def start_session(self, session_id: str, profile_id: str, at: float) -> None:
        key = self.keys.session(session_id)
        if not self.tx.absent(key, "profile_id"):
            raise BatchFailed(f"session {session_id!r} exists already")
        self.tx.hset(key, "profile_id", profile_id)
        self.tx.hset(key, "started_at", repr(at))
        self.tx.hset(key, "last_seen", repr(at))
        self.tx.add(self.keys.profile_sessions(profile_id), session_id, repr(at))

    def touch_session(self, session_id: str, at: float) -> None:
        key = self.keys.session(session_id)
        if at <= float(self.tx.hget(key, "last_seen") or "-inf"):
            return
        owner = self.tx.hget(key, "profile_id")
        self.tx.hset(key, "last_seen", repr(at))
        if owner is not None:
            self.tx.add(self.keys.profile_sessions(owner), session_id, repr(at))


class BatchFailed(Exception):
    """This batch cannot be stored (as a constraint violation would fail it in SQL)."""


class Conflict:
    """The batch's script found a value changed since the plan read it."""

    def __init__(self, cell: Cell | None) -> None:
        self.cell = cell


@dataclass(slots=True)
class PlannedJob:
    batch: Batch
    commit: Commit
    attempts: int = 0
    # Values a failed check named: read up front next time, so that a plan that relied
    # on one without reading it (see Tx.absent) sees it.
    stale: list[Cell] = field(default_factory=list)


@dataclass(slots=True)
class BatchPlan:
    tx: Tx
    outcomes: list[Outcome]


def event_fields(event: EventRecord, profile_id: str | None, session_id: str | None) -> list[str]:
    values: list[tuple[str, str | None]] = [
        ("message_id", event.message_id),
        ("type", event.type),
        ("name", event.name),
        ("user_id", event.user_id),
        ("anonymous_id", event.anonymous_id),
        ("timestamp", event.timestamp),
        ("received_at", event.received_at),
        ("source_id", event.source_id),
        ("profile_id", profile_id),
        ("session_id", session_id),
        ("warnings", dumps(list(event.warnings)) if event.warnings else None),
        ("payload", event.payload),
    ]
    return flatten(values)


def rejection_fields(rejection: RejectionRecord) -> list[str]:
    values: list[tuple[str, str | None]] = [
        ("source_id", rejection.source_id),
        ("reason", rejection.reason),
        ("message", rejection.message),
        ("received_at", rejection.received_at),
        ("endpoint", rejection.endpoint),
        ("index", None if rejection.index is None else str(rejection.index)),
        ("message_id", rejection.message_id),
        ("payload", rejection.payload),
    ]
    return flatten(values)


def flatten(values: list[tuple[str, str | None]]) -> list[str]:
    flat: list[str] = []
    for name, value in values:
        if value is not None:
            if not isinstance(value, str):
                raise TypeError(f"{name} must be text, not {type(value).__name__}")
            flat += (name, value)
    return flat
