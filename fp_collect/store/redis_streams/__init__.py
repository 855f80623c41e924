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
(:mod:`fp_collect.store.identity`, over :class:`Graph`). Every value the plan read is
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
nobody else is writing and its timeout covers the socket timeouts below (redis-py cannot cut
a command short), and otherwise joins the writer thread's next pipeline.

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

from fp_collect.store.redis_streams.options import (
    DEFAULT_CLAIM_GRACE,
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUTS,
)
from fp_collect.store.redis_streams.store import RedisStore

__all__ = ["DEFAULT_CLAIM_GRACE", "DEFAULT_PREFIX", "DEFAULT_TIMEOUTS", "RedisStore"]
