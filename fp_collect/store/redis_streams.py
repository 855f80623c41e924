"""``redis://host:6379/0``: events on Redis Streams; dedup, claims and profiles in Redis.

Every key starts with the ``prefix=`` option (``fp:`` by default), so several collectors
(or test runs) share one server without seeing each other:

======================================  ====================================================
``{p}events:{source_id}``               stream: the source's stored events, oldest first
``{p}rejections``                       stream: everything refused, every source
``{p}ids:events``, ``{p}ids:rejections``  counters: the last id handed out (INCR)
``{p}sources``                          set: the sources that have an events stream
``{p}messages:{source_id}``             hash: messageId -> id of the stored event (dedup)
``{p}claim:["source","kind","key"]``    string: the claim's ``until``; "" when forever
``{p}identities:{scope}``               hash: ``kind:value`` -> the profile owning it
``{p}profile:{id}``                     hash: scope, created_at, traits (JSON), merged_into
``{p}profile-identities:{id}``          set: ``["scope","kind","value"]`` the profile owns
``{p}profile-sessions:{id}``            sorted set: the profile's sessions by last_seen
``{p}session:{id}``                     hash: profile_id, started_at, last_seen
======================================  ====================================================

**Entries.** An event is stored as a stream entry whose ID is ``{id}-0``, ``id`` being
:attr:`StoredEvent.id`: one counter serves every source, so ids grow in storage order
across all streams and a reader's ``after_id`` cursor is an XRANGE start. Its fields:
``message_id``, ``type``, ``name``, ``user_id``, ``anonymous_id``, ``timestamp``,
``received_at``, ``source_id``, ``profile_id``, ``session_id``, ``warnings`` (a JSON
array) and ``payload``, the event JSON exactly as kept; a field whose value is null is
left out. A rejection entry has ``source_id``, ``reason``, ``message``, ``received_at``,
``endpoint``, ``index``, ``message_id`` and ``payload`` (the raw text as received).
Consumers read with XREADGROUP; nothing here depends on them.

**Trimming.** Streams are never trimmed unless ``maxlen=N`` is given; then each XADD
trims its stream to about N entries (``MAXLEN ~``, which Redis does cheaply, whole macro
nodes at a time). Trimmed events are gone for every reader, including consumer groups
that had not read them yet; dedup is unaffected (``messages:`` keeps every messageId).

**One batch, one script.** A batch is planned in Python: dedup, the claims (decided with
:func:`~fp_collect.store.base.claim_is_held`, like every backend) and identity resolution
(:mod:`fp_collect.store.identity`, over :class:`_Graph`). Every value the plan read is
recorded; the plan's writes, appends included, become one Lua script call, which first
checks that each recorded value is still what the plan saw and only then writes, all in
one step. If anything changed (another process committed in between), nothing is
written and the batch is planned again from fresh reads. This is optimistic concurrency
at the level of single hash fields, chosen over WATCH/MULTI (which watches whole keys:
one dedup hash per source would make every concurrent commit of a source conflict, and
a conflict would abort every batch of the transaction) and over locks (a lock that
expires while its holder stalls is no lock). Claims and dedup are decided on the same
footing, so a refused event takes none of its claims, and two processes creating the
first event of one visitor end on one profile.

**The guarantee.** Redis runs a script without interleaving any other command, and ours
writes only after every check passed, so a batch is stored entirely or not at all
(events, their claims, dedup entries, profile and session changes, and rejections). A
crash does not split one either: snapshots are taken between commands, the AOF and
replicas receive a script's writes as one MULTI/EXEC block, and Redis refuses a script
for lack of memory only before its first write. What could split one is a write refused
half-way through, and that takes another program meddling with these keys: a key
overwritten with another type, or the ``ids:`` counters deleted while the streams remain
(XADD then refuses the smaller ID). The commit is settled once Redis has answered the
script: what that survives is Redis' persistence configuration (``appendonly yes`` with
``appendfsync always`` for a 2xx to survive power loss; replication is asynchronous).
Keep ``maxmemory-policy noeviction``: an evicted dedup hash or claim would be forgotten.
Use one primary (with replicas if you like), not Redis Cluster: a batch's script touches
keys in many hash slots.

**Group commit.** One writer thread per store takes every queued batch (up to
``MAX_GROUP``) and sends their scripts in one pipeline: each batch is still its own
atomic step. A batch whose commit was cancelled before the writer took it is skipped.
A blocking :meth:`RedisStore.commit` (a WSGI request thread) sends its batch itself when
nobody else is writing, and otherwise joins the writer thread's next pipeline.

**Outages.** Every socket operation is bounded by ``socket_timeout`` and
``socket_connect_timeout`` (3 and 2 seconds unless the URL says otherwise). redis-py's own
retries are turned off: a script resent after its answer was lost would find its own
writes and report its events as duplicates of themselves. When Redis cannot be reached
or does not answer, the group being committed fails with :class:`StoreUnavailable`, and
so does every batch queued behind it, at once: a batch fails within one such timeout
(``socket_connect_timeout + socket_timeout``) after the attempt in progress when it was
submitted, so within about twice that at worst, 10 seconds by default. Nothing needs
restarting: the next batch connects again. A batch whose answer was lost may or may not
have been stored; the client's retry is recognised by messageId, so an event answered
2xx is stored exactly once.

**Windowed claims** are stored with an expiry so Redis reclaims them:
``until - at + claim_grace`` seconds after they are taken. The decision always compares
the stored ``until`` with the new claim's ``at``; the expiry only loses a claim early if
claims' ``at`` times lag the Redis clock by more than ``claim_grace`` (a day by default)
more than the claim they meet did.

Reads (:meth:`RedisStore.events` and friends) scan the streams with XRANGE from the
cursor and filter in Python: fine for paging and inspection; consumers that need every
event should read the streams with a consumer group.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import ujson
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry

from fp_collect.decoding import dumps
from fp_collect.errors import ConfigError, StoreUnavailable
from fp_collect.store.base import (
    DUPLICATE,
    STORED,
    UNKNOWN_USER,
    Batch,
    Commit,
    EventRecord,
    Identity,
    Job,
    Outcome,
    Query,
    RejectionRecord,
    Store,
    StoredEvent,
    StoredProfile,
    StoredRejection,
    WriteQueue,
    claim_is_held,
    refused_records,
)
from fp_collect.store.identity import resolve_profile, resolve_session

MAX_GROUP = 512
# A batch planned again this often, each time beaten by another writer, fails.
MAX_ATTEMPTS = 50
DEFAULT_PREFIX = "fp:"
DEFAULT_CLAIM_GRACE = 86400.0
# Bounds on every socket operation; redis-py's own default (none before 6.0) would let a
# stalled server hold a request forever.
DEFAULT_TIMEOUTS = {"socket_timeout": "3", "socket_connect_timeout": "2"}
_PAGE = 1000

# Checks, then writes. ARGV: maxlen ("" for none), the number of checks, each as
# (kind, key index, field, expected: "" for nil, else "=" .. value), the number of
# writes, each as an opcode with its key indices and arguments. Nothing is written unless
# every check passes; the answer is {"ok"} or {"conflict", index of the failed check}.
_COMMIT = """
local maxlen = ARGV[1]
local function key(i) return KEYS[tonumber(i)] end
local function append(counter, stream, n, at)
  local id = redis.call('INCR', counter)
  local args = {'XADD', stream}
  if maxlen ~= '' then
    args[3], args[4], args[5] = 'MAXLEN', '~', maxlen
  end
  args[#args + 1] = string.format('%d-0', id)
  for f = at, at + 2 * n - 1 do
    args[#args + 1] = ARGV[f]
  end
  redis.call(unpack(args))
  return id
end
local i = 3
for c = 1, tonumber(ARGV[2]) do
  local kind, k, f = ARGV[i], key(ARGV[i + 1]), ARGV[i + 2]
  local actual
  if kind == 'h' then
    actual = redis.call('HGET', k, f)
  elseif kind == 'hx' then
    actual = tostring(redis.call('HEXISTS', k, f))
  elseif kind == 'g' then
    actual = redis.call('GET', k)
  elseif kind == 't' then
    actual = redis.call('ZREVRANGE', k, 0, 0)[1]
  elseif kind == 'sc' then
    actual = tostring(redis.call('SCARD', k))
  elseif kind == 'zc' then
    actual = tostring(redis.call('ZCARD', k))
  elseif kind == 'sm' then
    actual = tostring(redis.call('SISMEMBER', k, f))
  elseif kind == 'zm' then
    actual = redis.call('ZSCORE', k, f) and '1' or '0'
  else
    return redis.error_reply('fp-collect: unknown check ' .. kind)
  end
  if (actual and ('=' .. actual) or '') ~= ARGV[i + 3] then
    return {'conflict', c}
  end
  i = i + 4
end
local writes = tonumber(ARGV[i])
i = i + 1
for _ = 1, writes do
  local op = ARGV[i]
  if op == 'hset' then
    redis.call('HSET', key(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  elseif op == 'set' then
    if ARGV[i + 3] == '' then
      redis.call('SET', key(ARGV[i + 1]), ARGV[i + 2])
    else
      redis.call('SET', key(ARGV[i + 1]), ARGV[i + 2], 'PX', ARGV[i + 3])
    end
    i = i + 4
  elseif op == 'sadd' then
    redis.call('SADD', key(ARGV[i + 1]), ARGV[i + 2])
    i = i + 3
  elseif op == 'zadd' then
    redis.call('ZADD', key(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  elseif op == 'del' then
    redis.call('DEL', key(ARGV[i + 1]))
    i = i + 2
  elseif op == 'event' then
    -- counter, stream, dedup hash; messageId; field count; fields
    local n = tonumber(ARGV[i + 5])
    local id = append(key(ARGV[i + 1]), key(ARGV[i + 2]), n, i + 6)
    redis.call('HSET', key(ARGV[i + 3]), ARGV[i + 4], string.format('%d', id))
    i = i + 6 + 2 * n
  elseif op == 'rejection' then
    -- counter, stream; field count; fields
    local n = tonumber(ARGV[i + 3])
    append(key(ARGV[i + 1]), key(ARGV[i + 2]), n, i + 4)
    i = i + 4 + 2 * n
  else
    return redis.error_reply('fp-collect: unknown write ' .. op)
  end
end
return {'ok'}
"""

# A value a plan read: (kind, key, field) -> what it saw. Kinds are the script's checks:
# "h" a hash field, "hx" whether a hash field exists, "g" a string key.
_Cell = tuple[str, str, str]
_Check = tuple[str, str, str, str | None]
_Write = tuple[str, tuple[str, ...], tuple[str, ...]]


class _Keys:
    """Every key name, in one place (see the module docstring)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.rejections = prefix + "rejections"
        self.event_ids = prefix + "ids:events"
        self.rejection_ids = prefix + "ids:rejections"
        self.sources = prefix + "sources"

    def events(self, source_id: str) -> str:
        return f"{self.prefix}events:{source_id}"

    def messages(self, source_id: str) -> str:
        return f"{self.prefix}messages:{source_id}"

    def claim(self, source_id: str, kind: str, key: str) -> str:
        # JSON keeps the three parts apart whatever characters they hold.
        return f"{self.prefix}claim:{_json([source_id, kind, key])}"

    def identities(self, scope: str) -> str:
        return f"{self.prefix}identities:{scope}"

    def profile(self, profile_id: str) -> str:
        return f"{self.prefix}profile:{profile_id}"

    def profile_identities(self, profile_id: str) -> str:
        return f"{self.prefix}profile-identities:{profile_id}"

    def profile_sessions(self, profile_id: str) -> str:
        return f"{self.prefix}profile-sessions:{profile_id}"

    def session(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@dataclass(slots=True)
class _Collection:
    """Planned changes to a set or sorted set: emptied first (``cleared``), then ``added``
    (member -> score; "" for a set)."""

    cleared: bool = False
    added: dict[str, str] = field(default_factory=dict)

    def apply(self, later: _Collection) -> None:
        if later.cleared:
            self.cleared, self.added = True, dict(later.added)
        else:
            self.added.update(later.added)


class _Round:
    """One attempt at committing a group: values read from Redis, and the writes that
    the batches planned so far will have made by the time the next one's script runs."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._cache: dict[_Cell, str | None] = {}
        self._members: dict[str, list[str]] = {}
        self._tops: dict[str, str | None] = {}
        self.cells: dict[_Cell, str | None] = {}
        self.collections: dict[str, _Collection] = {}
        # Sets of profiles created this round: empty in Redis, no need to ask.
        self.fresh: set[str] = set()

    def prefetch(self, cells: Iterable[_Cell], tops: Iterable[str] = ()) -> None:
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
            self._cache[cell] = _text(value)
        for key, value in zip(top_keys, replies[len(wanted) :], strict=True):
            self._tops[key] = _text(value[0]) if value else None

    def value(self, cell: _Cell) -> str | None:
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

    def absorb(self, tx: _Tx) -> None:
        """A batch is planned: the next ones see its writes."""
        self.cells.update(tx.cells)
        self.fresh |= tx.fresh
        for key, changes in tx.collections.items():
            self.collections.setdefault(key, _Collection()).apply(changes)

    def seen(self, cell: _Cell) -> bool:
        return cell in self._cache or cell in self.cells


class _Tx:
    """One batch's plan: reads through the round (recording each as a check), and its own
    writes, which it reads back itself."""

    def __init__(self, round_: _Round) -> None:
        self.round = round_
        self.cells: dict[_Cell, str | None] = {}
        self.collections: dict[str, _Collection] = {}
        self.checks: list[_Check] = []
        self._checked: set[tuple[str, str, str]] = set()
        self.writes: list[_Write] = []
        # Collections that cannot exist yet: their profile is created by this plan.
        self.fresh: set[str] = set()

    def _check(self, kind: str, key: str, name: str, expected: str | None) -> None:
        if (kind, key, name) not in self._checked:
            self._checked.add((kind, key, name))
            self.checks.append((kind, key, name, expected))

    def _before(self, cell: _Cell) -> str | None:
        """The value as it stands before this batch's script, recorded as a check."""
        value = self.round.value(cell)
        self._check(*cell, value)
        return value

    def read(self, cell: _Cell) -> str | None:
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
        no round trip: the script checks it, and a retry reads it (``_Job.stale``)."""
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

    def top(self, key: str, score: Callable[[str], _Cell]) -> str | None:
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
        self.collections.setdefault(key, _Collection()).added[member] = score
        if score:
            self.writes.append(("zadd", (key,), (score, member)))
        else:
            self.writes.append(("sadd", (key,), (member,)))

    def delete(self, key: str) -> None:
        self.collections[key] = _Collection(cleared=True)
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


class _Graph:
    """The identity primitives of :mod:`fp_collect.store.identity` over one batch's plan."""

    def __init__(self, tx: _Tx, keys: _Keys) -> None:
        self.tx = tx
        self.keys = keys

    def owner(self, scope: str, identity: Identity) -> str | None:
        return self.tx.hget(self.keys.identities(scope), _field(identity))

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

    def create_profile(self, profile_id: str, scope: str, at: float) -> None:
        key = self.keys.profile(profile_id)
        if not self.tx.absent(key, "created_at"):
            raise _BatchFailed(f"profile {profile_id!r} exists already")
        self.tx.hset(key, "scope", scope)
        self.tx.hset(key, "created_at", repr(at))
        self.tx.hset(key, "traits", "{}")
        # Checked absent, so it owns nothing yet: its sets need no read. (Only a profile
        # that exists is given identities or sessions, and a merged one's sets are gone.)
        self.tx.fresh.add(self.keys.profile_identities(profile_id))
        self.tx.fresh.add(self.keys.profile_sessions(profile_id))

    def attach(self, scope: str, identity: Identity, profile_id: str) -> None:
        self.tx.hset(self.keys.identities(scope), _field(identity), profile_id)
        self.tx.add(self.keys.profile_identities(profile_id), _member(scope, identity))

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
        kept = self._traits(survivor)
        self._write_traits(survivor, {**self._traits(merged), **kept})
        self.tx.hset(self.keys.profile(merged), "merged_into", survivor)

    def update_traits(self, profile_id: str, traits: dict[str, object]) -> None:
        self._write_traits(profile_id, {**self._traits(profile_id), **traits})

    def _traits(self, profile_id: str) -> dict[str, object]:
        text = self.tx.hget(self.keys.profile(profile_id), "traits")
        return cast(dict[str, object], ujson.loads(text or "{}"))

    def _write_traits(self, profile_id: str, traits: dict[str, object]) -> None:
        self.tx.hset(self.keys.profile(profile_id), "traits", dumps(traits))

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
            raise _BatchFailed(f"session {session_id!r} exists already")
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


def _field(identity: Identity) -> str:
    # Identity kinds are fixed words (user_id, anonymous_id, email): the first ":" splits.
    return f"{identity.kind}:{identity.value}"


def _member(scope: str, identity: Identity) -> str:
    return _json([scope, identity.kind, identity.value])


class _BatchFailed(Exception):
    """This batch cannot be stored (as a constraint violation would fail it in SQL)."""


class _Conflict:
    """The batch's script found a value changed since the plan read it."""

    def __init__(self, cell: _Cell | None) -> None:
        self.cell = cell


@dataclass(slots=True)
class _Job:
    batch: Batch
    commit: Commit
    attempts: int = 0
    # Values a failed check named: read up front next time, so that a plan that relied
    # on one without reading it (see _Tx.absent) sees it.
    stale: list[_Cell] = field(default_factory=list)


@dataclass(slots=True)
class _Plan:
    tx: _Tx
    outcomes: list[Outcome]


class RedisStore(Store):
    """Events on one Redis Stream per source; dedup, claims and profiles in Redis.

    ::

        store = RedisStore("redis://127.0.0.1:6379/0?prefix=shop:&maxlen=1000000")

    :param url: ``redis://`` or ``rediss://`` (TLS) URL. Options of our own, in the query:
        ``prefix`` (of every key, default ``fp:``), ``maxlen`` (trim each stream to about
        this many entries; default: never trim) and ``claim_grace`` (seconds a windowed
        claim is kept past its window, default 86400). Every other query option goes to
        :meth:`redis.Redis.from_url` (``socket_timeout``, ``socket_connect_timeout``,
        ``client_name``, ``ssl_ca_certs``, ...); the timeouts default to 3 and 2 seconds.
    """

    def __init__(self, url: str) -> None:
        redis_url, options = _split_options(url)
        self._keys = _Keys(options.get("prefix", DEFAULT_PREFIX))
        self._maxlen = _positive_int(options.get("maxlen"), "maxlen")
        self._claim_grace = _grace(options.get("claim_grace"))
        try:
            self._client: redis.Redis = redis.Redis.from_url(
                redis_url,
                decode_responses=True,
                # One attempt per command: a resent script could be stored twice.
                retry=Retry(NoBackoff(), 0),
            )
            pool = self._client.connection_pool
            # Build (without connecting) one connection now, so that a misspelt option
            # is an error at start-up, not on the first request.
            pool.connection_class(**pool.connection_kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad Redis storage URL {_redact(url)!r}: {exc}") from exc
        self._commit = self._client.register_script(_COMMIT)
        self._writes = WriteQueue("Redis store is closed")
        # How many times a batch was planned again after another writer got in first.
        self.conflicts = 0
        self._writer = threading.Thread(target=self._run, name="fp-collect-redis", daemon=True)
        self._writer.start()

    @property
    def prefix(self) -> str:
        return self._keys.prefix

    @property
    def client(self) -> redis.Redis:
        """The redis-py client (decoding responses, no automatic retries)."""
        return self._client

    # -- writing -------------------------------------------------------------------------

    def submit(self, batch: Batch) -> Commit:
        return self._writes.submit(batch)

    def commit(self, batch: Batch, timeout: float | None = None) -> list[Outcome]:
        # Written here when nobody else is writing (see WriteQueue.commit_here); a batch
        # written here is bounded by the client's socket timeouts.
        return self._writes.commit_here(batch, timeout, self._write)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            taken, stopping = self._writes.next_group(MAX_GROUP)
            with self._writes.writing:
                unreachable = self._write(taken)
            if unreachable is not None:
                # Redis is unreachable or stalled: fail at once everything that queued
                # behind this group rather than letting each wait for its own timeout.
                queued, closing = self._writes.take_all()
                stopping = stopping or closing
                for queued_job in queued:
                    _fail(
                        _Job(queued_job.batch, queued_job.commit),
                        f"Redis commit failed: {unreachable}",
                        unreachable,
                    )
        with self._writes.writing:
            self._client.close()

    def _write(self, taken: list[Job]) -> BaseException | None:
        """Commit ``taken`` (failing every batch of it if that fails); the error when
        Redis could not be reached or stalled, else None."""
        group = [_Job(job.batch, job.commit) for job in taken]
        try:
            self._commit_group(group)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            for job in group:
                _fail(job, f"Redis commit failed: {exc}", exc)
            return exc
        except Exception as exc:  # noqa: BLE001 - any failure here must reach every caller
            for job in group:
                _fail(job, f"Redis commit failed: {exc}", exc)
        return None

    def _commit_group(self, group: list[_Job]) -> None:
        pending = group
        while pending:
            results = self._attempt(pending)
            retry: list[_Job] = []
            for job, result in zip(pending, results, strict=True):
                if isinstance(result, _Conflict):
                    self.conflicts += 1
                    job.attempts += 1
                    if result.cell is not None:
                        job.stale.append(result.cell)
                    if job.attempts >= MAX_ATTEMPTS:
                        job.commit.set_exception(
                            StoreUnavailable(f"batch not stored: {job.attempts} conflicts")
                        )
                    else:
                        retry.append(job)
                else:
                    job.commit.settle(result)
            if retry and retry[0].attempts > 2:
                # Beaten again and again: let the other writers through first.
                time.sleep(random.uniform(0, 0.001 * retry[0].attempts))
            pending = retry

    def _attempt(self, jobs: list[_Job]) -> list[list[Outcome] | _Conflict | BaseException]:
        """Plan every batch over one round of reads, then run their scripts in one
        pipeline. A RedisError other than a refused command fails the whole group."""
        round_ = _Round(self._client)
        self._prefetch(round_, jobs)
        results: list[list[Outcome] | _Conflict | BaseException] = []
        plans: list[tuple[int, _Plan]] = []
        for job in jobs:
            try:
                plan = self._plan(round_, job.batch)
            except RedisError as exc:
                if not isinstance(exc, ResponseError):
                    raise  # the connection: the whole group fails
                results.append(_unavailable(f"batch not stored: {exc}", exc))
                continue
            except Exception as exc:  # noqa: BLE001 - this batch cannot be stored, the rest can
                results.append(_unavailable(f"batch not stored: {exc}", exc))
                continue
            results.append(plan.outcomes)
            if plan.tx.writes:  # an empty batch has nothing to check or write
                round_.absorb(plan.tx)
                plans.append((len(results) - 1, plan))
        if not plans:
            return results
        maxlen = "" if self._maxlen is None else str(self._maxlen)
        pipe = self._client.pipeline(transaction=False)
        for _, plan in plans:
            keys, argv = plan.tx.encode(maxlen)
            self._commit(keys=keys, args=argv, client=pipe)
        replies = pipe.execute(raise_on_error=False)
        for (at, plan), reply in zip(plans, replies, strict=True):
            if isinstance(reply, ResponseError):
                results[at] = _unavailable(f"batch not stored: {reply}", reply)
            elif isinstance(reply, Exception):
                raise reply
            elif reply[0] != "ok":
                check = plan.tx.checks[int(reply[1]) - 1]
                kind, key, name, _ = check
                stale = {"h": "h", "hx": "h", "g": "g"}.get(kind)
                results[at] = _Conflict((stale, key, name) if stale else None)
        return results

    def _prefetch(self, round_: _Round, jobs: list[_Job]) -> None:
        """Read in a few round trips what planning the group will ask for."""
        keys = self._keys
        first: list[_Cell] = []
        for job in jobs:
            first += job.stale
            for event in job.batch.events:
                first.append(("h", keys.messages(event.source_id), event.message_id))
                for claim in event.claims:
                    first.append(("g", keys.claim(event.source_id, claim.kind, claim.key), ""))
                op = event.identity
                if op is None:
                    continue
                for identity in (*op.identities, *op.lookups):
                    first.append(("h", keys.identities(op.scope), _field(identity)))
                if op.profile_id is not None:
                    first += _profile_cells(keys, op.profile_id)
                if event.session is not None and event.session.session_id is not None:
                    first += _session_cells(keys, event.session.session_id)
        round_.prefetch(first)
        # Then the profiles those identities lead to, their latest sessions, and when
        # those were last seen.
        found = {round_.value(c) for c in first if c[1].startswith(keys.identities(""))}
        owners = sorted(owner for owner in found if owner)
        with_sessions = any(e.session is not None for job in jobs for e in job.batch.events)
        tops = [keys.profile_sessions(owner) for owner in owners if with_sessions]
        round_.prefetch([cell for owner in owners for cell in _profile_cells(keys, owner)], tops)
        latest = (round_.top_candidates(key) for key in tops)
        round_.prefetch(cell for top in latest for s in top for cell in _session_cells(keys, s))

    def _plan(self, round_: _Round, batch: Batch) -> _Plan:
        tx = _Tx(round_)
        graph = _Graph(tx, self._keys)
        outcomes = [self._plan_event(tx, graph, event) for event in batch.events]
        stored = {e.source_id for e, o in zip(batch.events, outcomes, strict=True) if o.stored}
        for source_id in sorted(stored):
            tx.add(self._keys.sources, source_id)
        refused = refused_records(batch, outcomes)
        counter_and_stream = (self._keys.rejection_ids, self._keys.rejections)
        for rejection in (*refused, *batch.rejections):
            tx.append(counter_and_stream, (), _rejection_fields(rejection))
        return _Plan(tx, outcomes)

    def _plan_event(self, tx: _Tx, graph: _Graph, event: EventRecord) -> Outcome:
        keys = self._keys
        messages = keys.messages(event.source_id)
        if tx.exists(messages, event.message_id):
            return DUPLICATE
        claim_keys = [keys.claim(event.source_id, c.kind, c.key) for c in event.claims]
        for claim, key in zip(event.claims, claim_keys, strict=True):
            held = tx.read(("g", key, ""))
            if held is not None and claim_is_held(float(held) if held else None, claim.at):
                return Outcome(False, claim.kind)
        profile_id = session_id = None
        if event.identity is not None:
            profile_id = resolve_profile(graph, event.identity)
            if profile_id is None:
                return UNKNOWN_USER
            if event.session is not None:
                session_id = resolve_session(graph, event.session, profile_id)
        for claim, key in zip(event.claims, claim_keys, strict=True):
            if claim.until is None or not math.isfinite(claim.until):
                tx.set(key, "", None)
            else:
                window = max(claim.until - claim.at, 0.0) + self._claim_grace
                tx.set(key, repr(claim.until), max(1, math.ceil(window * 1000)))
        # The script writes the dedup entry with the id it draws; later events of this
        # round only ask whether it exists.
        tx.cells[("h", messages, event.message_id)] = ""
        tx.append(
            (keys.event_ids, keys.events(event.source_id), messages),
            (event.message_id,),
            _event_fields(event, profile_id, session_id),
        )
        return STORED if profile_id is None else Outcome(True, None, profile_id, session_id)

    # -- reading -------------------------------------------------------------------------

    def events(self, query: Query = Query()) -> Iterator[StoredEvent]:
        _check_limit(query)
        try:
            if query.source_id is not None:
                sources = [query.source_id]
            else:
                sources = sorted(cast(Iterable[str], self._client.smembers(self._keys.sources)))
            streams = [self._entries(self._keys.events(s), query.after_id) for s in sources]
            rows: Iterator[StoredEvent] = (
                _stored_event(n, f) for n, f in heapq.merge(*streams, key=_first)
            )
            if query.profile_id is not None:
                rows = self._of_family(rows, query.profile_id)
                query = replace(query, profile_id=None)
            return iter(_take((r for r in rows if _event_matches(query, r)), query.limit))
        except RedisError as exc:
            raise StoreUnavailable(f"Redis read failed: {exc}") from exc

    def rejections(self, query: Query = Query()) -> Iterator[StoredRejection]:
        _check_limit(query)
        try:
            rows = (
                _stored_rejection(n, f)
                for n, f in self._entries(self._keys.rejections, query.after_id)
            )
            return iter(_take((r for r in rows if _rejection_matches(query, r)), query.limit))
        except RedisError as exc:
            raise StoreUnavailable(f"Redis read failed: {exc}") from exc

    def _of_family(self, rows: Iterator[StoredEvent], profile_id: str) -> Iterator[StoredEvent]:
        """The rows of ``profile_id``'s survivor and of every profile merged into it."""
        survivor = self.profile(profile_id)
        if survivor is None:
            return
        # Each distinct profile id is followed through its merges once per read.
        verdicts: dict[str, bool] = {survivor.id: True}
        for row in rows:
            if row.profile_id is None:
                continue
            member = verdicts.get(row.profile_id)
            if member is None:
                found = self.profile(row.profile_id)
                member = verdicts[row.profile_id] = found is not None and found.id == survivor.id
            if member:
                yield row

    def _entries(self, stream: str, after_id: int) -> Iterator[tuple[int, dict[str, str]]]:
        start = after_id + 1
        while True:
            page = cast(
                list[tuple[str, dict[str, str]]],
                self._client.xrange(stream, min=f"{start}-0", max="+", count=_PAGE),
            )
            for entry_id, fields in page:
                number = int(entry_id.partition("-")[0])
                yield number, fields
            if len(page) < _PAGE:
                return
            start = number + 1

    def profile(self, profile_id: str) -> StoredProfile | None:
        keys = self._keys
        try:
            current, seen = profile_id, set()
            while current not in seen:
                seen.add(current)
                # One MULTI/EXEC: the profile and its identities as of one instant.
                pipe = self._client.pipeline(transaction=True)
                pipe.hgetall(keys.profile(current))
                pipe.smembers(keys.profile_identities(current))
                found, members = pipe.execute()
                if not found:
                    return None
                if "merged_into" in found:
                    current = found["merged_into"]
                    continue
                scope = found["scope"]
                identities = [
                    Identity(kind, value)
                    for member_scope, kind, value in map(json.loads, members)
                    if member_scope == scope
                ]
                identities.sort(key=lambda i: (i.kind, i.value))
                traits = ujson.loads(found["traits"])
                return StoredProfile(
                    current, scope, float(found["created_at"]), traits, tuple(identities)
                )
        except RedisError as exc:
            raise StoreUnavailable(f"Redis read failed: {exc}") from exc
        raise StoreUnavailable(f"profile {profile_id!r} is merged in a cycle")

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Commit (or fail) everything already submitted, then stop the writer."""
        self._writes.close()
        if threading.current_thread() is not self._writer:
            self._writer.join()


def _session_cells(keys: _Keys, session_id: str) -> list[_Cell]:
    key = keys.session(session_id)
    return [("h", key, "profile_id"), ("h", key, "last_seen")]


def _profile_cells(keys: _Keys, profile_id: str) -> list[_Cell]:
    key = keys.profile(profile_id)
    return [("h", key, "created_at"), ("h", key, "merged_into")]


def _event_fields(event: EventRecord, profile_id: str | None, session_id: str | None) -> list[str]:
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
    return _flatten(values)


def _rejection_fields(rejection: RejectionRecord) -> list[str]:
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
    return _flatten(values)


def _flatten(values: list[tuple[str, str | None]]) -> list[str]:
    flat: list[str] = []
    for name, value in values:
        if value is not None:
            if not isinstance(value, str):
                raise TypeError(f"{name} must be text, not {type(value).__name__}")
            flat += (name, value)
    return flat


def _stored_event(number: int, fields: dict[str, str]) -> StoredEvent:
    warnings = fields.get("warnings")
    return StoredEvent(
        id=number,
        source_id=fields["source_id"],
        message_id=fields["message_id"],
        type=fields["type"],
        name=fields.get("name"),
        user_id=fields.get("user_id"),
        anonymous_id=fields.get("anonymous_id"),
        timestamp=fields["timestamp"],
        received_at=fields["received_at"],
        payload=fields["payload"],
        profile_id=fields.get("profile_id"),
        session_id=fields.get("session_id"),
        warnings=tuple(ujson.loads(warnings)) if warnings else (),
    )


def _stored_rejection(number: int, fields: dict[str, str]) -> StoredRejection:
    index = fields.get("index")
    return StoredRejection(
        id=number,
        source_id=fields.get("source_id"),
        reason=fields["reason"],
        message=fields["message"],
        received_at=fields["received_at"],
        endpoint=fields["endpoint"],
        payload=fields["payload"],
        index=None if index is None else int(index),
        message_id=fields.get("message_id"),
    )


def _in_window(query: Query, received_at: str) -> bool:
    return (query.since is None or received_at >= query.since) and (
        query.until is None or received_at < query.until
    )


def _event_matches(query: Query, row: StoredEvent) -> bool:
    return (
        (query.type is None or row.type == query.type)
        and (query.name is None or row.name == query.name)
        and (query.profile_id is None or row.profile_id == query.profile_id)
        and (not query.flagged or bool(row.warnings))
        and _in_window(query, row.received_at)
    )


def _rejection_matches(query: Query, row: StoredRejection) -> bool:
    return (
        (query.source_id is None or row.source_id == query.source_id)
        and (query.type is None or row.reason == query.type)
        and _in_window(query, row.received_at)
    )


def _take(rows: Iterable[Any], limit: int | None) -> list[Any]:
    """At most ``limit`` rows, read now: errors surface here, not in the caller's loop."""
    taken: list[Any] = []
    if limit == 0:
        return taken
    for row in rows:
        taken.append(row)
        if limit is not None and len(taken) >= limit:
            break
    return taken


def _first(item: tuple[int, dict[str, str]]) -> int:
    return item[0]


def _check_limit(query: Query) -> None:
    if query.limit is not None and query.limit < 0:
        raise ValueError(f"limit must be None or >= 0, not {query.limit}")


def _text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise StoreUnavailable(f"unexpected Redis reply {value!r}")


def _fail(job: _Job, message: str, cause: BaseException) -> None:
    if not job.commit.done():
        job.commit.set_exception(_unavailable(message, cause))


def _unavailable(message: str, cause: BaseException) -> StoreUnavailable:
    # One instance per commit: a shared exception would have its traceback rewritten by
    # every thread that raises it.
    error = StoreUnavailable(message)
    error.__cause__ = cause
    return error


_OPTIONS = ("prefix", "maxlen", "claim_grace")


def _split_options(url: str) -> tuple[str, dict[str, str]]:
    """The URL for redis-py (with default timeouts) and our own options."""
    parts = urlsplit(url)
    given: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in given:
            raise ConfigError(f"Redis storage URL {_redact(url)!r} gives {name!r} twice")
        given[name] = value
    ours = {name: value for name, value in given.items() if name in _OPTIONS}
    # RESP2 by default: every Redis since 5.0 speaks it; the URL may ask for protocol=3.
    theirs = {**DEFAULT_TIMEOUTS, "protocol": "2"}
    theirs.update((name, value) for name, value in given.items() if name not in _OPTIONS)
    return urlunsplit(parts._replace(query=urlencode(theirs))), ours


def _positive_int(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"Redis storage option {name} must be a positive integer, not {value!r}")
    return number


def _grace(value: str | None) -> float:
    if value is None:
        return DEFAULT_CLAIM_GRACE
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(f"Redis storage option claim_grace must be seconds >= 0, not {value!r}")
    return seconds


def _redact(url: str) -> str:
    """``url`` without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
