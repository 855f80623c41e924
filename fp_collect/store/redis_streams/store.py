"""The Redis store itself: the writer thread's group commits and the reads."""

from __future__ import annotations

import heapq
import json
import math
import random
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import cast

import redis
import ujson
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry

from fp_collect.errors import ConfigError, StoreUnavailable
from fp_collect.store.base import (
    DUPLICATE,
    Batch,
    Commit,
    EventRecord,
    Identity,
    Job,
    Outcome,
    Query,
    Store,
    StoredEvent,
    StoredProfile,
    StoredRejection,
    WriteQueue,
    claim_is_held,
    refused_records,
    restart_after_fork,
)
from fp_collect.store.identity import resolve_event
from fp_collect.store.redis_streams.keys import (
    Cell,
    Keys,
    identity_field,
    profile_cells,
    session_cells,
)
from fp_collect.store.redis_streams.options import (
    DEFAULT_PREFIX,
    parse_grace,
    positive_int,
    redact,
    split_options,
)
from fp_collect.store.redis_streams.plan import (
    BatchPlan,
    Conflict,
    Graph,
    PlannedJob,
    Round,
    Tx,
    event_fields,
    rejection_fields,
)
from fp_collect.store.redis_streams.rows import (
    check_limit,
    entry_number,
    event_matches,
    rejection_matches,
    stored_event,
    stored_rejection,
    take,
)
from fp_collect.store.redis_streams.script import COMMIT

MAX_GROUP = 512

# A batch planned again this often, each time beaten by another writer, fails.
MAX_ATTEMPTS = 50

READ_PAGE = 1000


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
        redis_url, options = split_options(url)
        self._keys = Keys(options.get("prefix", DEFAULT_PREFIX))
        self._maxlen = positive_int(options.get("maxlen"), "maxlen")
        self._claim_grace = parse_grace(options.get("claim_grace"))
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
            raise ConfigError(f"bad Redis storage URL {redact(url)!r}: {exc}") from exc
        self._commit = self._client.register_script(COMMIT)
        # How long a write may wait on a Redis that stopped answering: redis-py cannot cut
        # a command short, so a caller with less time than this hands its batch over.
        self._longest_write = sum(
            math.inf if value is None else float(value)
            for value in (
                pool.connection_kwargs.get("socket_connect_timeout"),
                pool.connection_kwargs.get("socket_timeout"),
            )
        )
        self._writes = WriteQueue("Redis store is closed")
        # How many times a batch was planned again after another writer got in first.
        self.conflicts = 0
        self._start_writer()
        restart_after_fork(self)

    def _start_writer(self) -> None:
        self._writer = threading.Thread(target=self._run, name="fp-collect-redis", daemon=True)
        self._writer.start()

    def _after_fork(self) -> None:
        """In a forked child (see :func:`restart_after_fork`): a writer of its own, with
        a queue of its own. redis-py's connection pool replaces its connections itself."""
        if self._writes.closed:
            return
        self._writes = WriteQueue("Redis store is closed")
        self._start_writer()

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
        # Written here when nobody else is writing (see WriteQueue.commit_here) and the
        # client's socket timeouts fit in ``timeout``; else by the writer thread.
        return self._writes.commit_here(batch, timeout, self._write, self._longest_write)

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
                    fail_job(
                        PlannedJob(queued_job.batch, queued_job.commit),
                        f"Redis commit failed: {unreachable}",
                        unreachable,
                    )
        with self._writes.writing:
            self._client.close()

    def _write(self, taken: list[Job]) -> BaseException | None:
        """Commit ``taken`` (failing every batch of it if that fails); the error when
        Redis could not be reached or stalled, else None."""
        group = [PlannedJob(job.batch, job.commit) for job in taken]
        try:
            self._commit_group(group)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            for job in group:
                fail_job(job, f"Redis commit failed: {exc}", exc)
            return exc
        except Exception as exc:  # noqa: BLE001 - any failure here must reach every caller
            for job in group:
                fail_job(job, f"Redis commit failed: {exc}", exc)
        return None

    def _commit_group(self, group: list[PlannedJob]) -> None:
        pending = group
        while pending:
            results = self._attempt(pending)
            retry: list[PlannedJob] = []
            for job, result in zip(pending, results, strict=True):
                if isinstance(result, Conflict):
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

    def _attempt(self, jobs: list[PlannedJob]) -> list[list[Outcome] | Conflict | BaseException]:
        """Plan every batch over one round of reads, then run their scripts in one
        pipeline. A RedisError other than a refused command fails the whole group."""
        round_ = Round(self._client)
        self._prefetch(round_, jobs)
        results: list[list[Outcome] | Conflict | BaseException] = []
        plans: list[tuple[int, BatchPlan]] = []
        for job in jobs:
            try:
                plan = self._plan(round_, job.batch)
            except RedisError as exc:
                if not isinstance(exc, ResponseError):
                    raise  # the connection: the whole group fails
                results.append(unavailable(f"batch not stored: {exc}", exc))
                continue
            except Exception as exc:  # noqa: BLE001 - this batch cannot be stored, the rest can
                results.append(unavailable(f"batch not stored: {exc}", exc))
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
                results[at] = unavailable(f"batch not stored: {reply}", reply)
            elif isinstance(reply, Exception):
                raise reply
            elif reply[0] != "ok":
                check = plan.tx.checks[int(reply[1]) - 1]
                kind, key, name, _ = check
                stale = {"h": "h", "hx": "h", "g": "g"}.get(kind)
                results[at] = Conflict((stale, key, name) if stale else None)
        return results

    def _prefetch(self, round_: Round, jobs: list[PlannedJob]) -> None:
        """Read in a few round trips what planning the group will ask for."""
        keys = self._keys
        first: list[Cell] = []
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
                    first.append(("h", keys.identities(op.scope), identity_field(identity)))
                if op.profile_id is not None:
                    first += profile_cells(keys, op.profile_id)
                if event.session is not None and event.session.session_id is not None:
                    first += session_cells(keys, event.session.session_id)
        round_.prefetch(first)
        # Then the profiles those identities lead to, their latest sessions, and when
        # those were last seen.
        found = {round_.value(c) for c in first if c[1].startswith(keys.identities(""))}
        owners = sorted(owner for owner in found if owner)
        with_sessions = any(e.session is not None for job in jobs for e in job.batch.events)
        tops = [keys.profile_sessions(owner) for owner in owners if with_sessions]
        round_.prefetch([cell for owner in owners for cell in profile_cells(keys, owner)], tops)
        latest = (round_.top_candidates(key) for key in tops)
        round_.prefetch(cell for top in latest for s in top for cell in session_cells(keys, s))

    def _plan(self, round_: Round, batch: Batch) -> BatchPlan:
        tx = Tx(round_)
        graph = Graph(tx, self._keys)
        outcomes = [self._plan_event(tx, graph, event) for event in batch.events]
        stored = {e.source_id for e, o in zip(batch.events, outcomes, strict=True) if o.stored}
        for source_id in sorted(stored):
            tx.add(self._keys.sources, source_id)
        refused = refused_records(batch, outcomes)
        counter_and_stream = (self._keys.rejection_ids, self._keys.rejections)
        for rejection in (*refused, *batch.rejections):
            tx.append(counter_and_stream, (), rejection_fields(rejection))
        return BatchPlan(tx, outcomes)

    def _plan_event(self, tx: Tx, graph: Graph, event: EventRecord) -> Outcome:
        keys = self._keys
        messages = keys.messages(event.source_id)
        if tx.exists(messages, event.message_id):
            return DUPLICATE
        claim_keys = [keys.claim(event.source_id, c.kind, c.key) for c in event.claims]
        for claim, key in zip(event.claims, claim_keys, strict=True):
            held = tx.read(("g", key, ""))
            if held is not None and claim_is_held(float(held) if held else None, claim.at):
                return Outcome(False, claim.kind)
        outcome = resolve_event(graph, event)
        if not outcome.stored:
            return outcome
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
            event_fields(event, outcome.profile_id, outcome.session_id),
        )
        return outcome

    # -- reading -------------------------------------------------------------------------

    def events(self, query: Query = Query()) -> Iterator[StoredEvent]:
        check_limit(query)
        try:
            if query.source_id is not None:
                sources = [query.source_id]
            else:
                sources = sorted(cast(Iterable[str], self._client.smembers(self._keys.sources)))
            streams = [self._entries(self._keys.events(s), query.after_id) for s in sources]
            rows: Iterator[StoredEvent] = (
                stored_event(n, f) for n, f in heapq.merge(*streams, key=entry_number)
            )
            if query.profile_id is not None:
                rows = self._of_family(rows, query.profile_id)
                query = replace(query, profile_id=None)
            return iter(take((r for r in rows if event_matches(query, r)), query.limit))
        except RedisError as exc:
            raise StoreUnavailable(f"Redis read failed: {exc}") from exc

    def rejections(self, query: Query = Query()) -> Iterator[StoredRejection]:
        check_limit(query)
        try:
            rows = (
                stored_rejection(n, f)
                for n, f in self._entries(self._keys.rejections, query.after_id)
            )
            return iter(take((r for r in rows if rejection_matches(query, r)), query.limit))
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
                self._client.xrange(stream, min=f"{start}-0", max="+", count=READ_PAGE),
            )
            for entry_id, fields in page:
                number = int(entry_id.partition("-")[0])
                yield number, fields
            if len(page) < READ_PAGE:
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


def fail_job(job: PlannedJob, message: str, cause: BaseException) -> None:
    if not job.commit.done():
        job.commit.set_exception(unavailable(message, cause))


def unavailable(message: str, cause: BaseException) -> StoreUnavailable:
    # One instance per commit: a shared exception would have its traceback rewritten by
    # every thread that raises it.
    error = StoreUnavailable(message)
    error.__cause__ = cause
    return error
