"""The collector: routes a neutral request through the pipeline and the store.

Adapters call :meth:`Collector.route` first (cheap: one dict lookup) so every path
that is not ours passes through to the host app with its body unread, then read the
body within ``route.max_body_bytes`` and call :meth:`handle` or :meth:`handle_async`.
Method handling and CORS live here, not in the adapters, so WSGI and ASGI cannot
drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from http import HTTPStatus
from typing import Any

from fp_collect import responses
from fp_collect.config import CollectorConfig
from fp_collect.dialects import Reader, Route, firstparty, segment, userevent
from fp_collect.errors import StoreUnavailable
from fp_collect.http import HeaderList, Request, Response
from fp_collect.pipeline import Pipeline, Prepared, recorded
from fp_collect.read_api import PROFILES_PATH, ReadAPI
from fp_collect.store import Store, open_store
from fp_collect.store.base import Batch, Outcome, Pending, RejectionRecord, within
from fp_collect.timestamps import format_iso

logger = logging.getLogger("fp_collect")

_PREFLIGHT_MAX_AGE = "86400"


class Collector:
    """First-party event collection, independent of any web framework.

    >>> from fp_collect import Collector, Source
    >>> collector = Collector(sources=[Source(write_key="my-key")], storage="memory://")
    >>> collector.route("/v1/track").name
    'track'
    >>> collector.close()

    :param config: a :class:`CollectorConfig`; or pass its fields as keyword arguments.
    :param store: a ready store, overriding ``config.storage`` (tests, sharing one store).
    :param clock: epoch seconds; injectable so tests can drive time.
    """

    def __init__(
        self,
        config: CollectorConfig | None = None,
        *,
        store: Store | None = None,
        clock: Callable[[], float] = time.time,
        **options: Any,
    ) -> None:
        if config is None:
            config = CollectorConfig(**options)
        elif options:
            raise TypeError("pass either a CollectorConfig or keyword options, not both")
        self.config = config
        self.pipeline = Pipeline(config, clock)
        self.store = store if store is not None else open_store(config.storage)
        dialects = {
            **segment.routes(self.pipeline),
            **firstparty.routes(self.pipeline),
            **userevent.routes(self.pipeline),
        }
        self._profile_route: Route | None = None
        if config.read_tokens:
            reads = ReadAPI(config.read_tokens, lambda: self.store)
            dialects.update(reads.routes())
            self._profile_route = reads.profile_route()
        self._routes = {config.prefix + path: route for path, route in dialects.items()}
        self._profiles_prefix = config.prefix + PROFILES_PATH
        self._any_origin = any("*" in s.allowed_origins for s in config.sources)
        self._origins = frozenset(o for s in config.sources for o in s.allowed_origins)

    def route(self, path: str) -> Route | None:
        """The collection route for ``path``, or None when the host app should answer."""
        route = self._routes.get(path)
        if route is None and len(path) > 1 and path.endswith("/"):
            route = self._routes.get(path[:-1])
        if route is None and self._profile_route is not None:
            profile_id = path[len(self._profiles_prefix) :]
            if path.startswith(self._profiles_prefix) and profile_id and "/" not in profile_id:
                route = self._profile_route
        return route

    def prepare(self, route: Route, request: Request) -> Prepared:
        """Everything short of the store: method, CORS preflight, then the dialect."""
        if request.method == "OPTIONS":
            return _fixed(self._preflight(route, request))
        if request.method not in route.methods:
            allow = ", ".join(sorted(route.methods | {"OPTIONS"}))
            body = responses.single_error(
                HTTPStatus.METHOD_NOT_ALLOWED,
                "method_not_allowed",
                f"{request.method[:20]} is not allowed here; use {allow}",
            )
            return _fixed(
                responses.json_response(HTTPStatus.METHOD_NOT_ALLOWED, body, [("allow", allow)])
            )
        try:
            assert route.handler is not None, "read routes are answered by handle()"
            return route.handler(request)
        except Exception:
            logger.exception("fp-collect failed on %s %s", request.method, request.path)
            return self._internal_error(request)

    def handle(self, route: Route, request: Request) -> Response:
        """Process ``request`` and wait (blocking) until its events are committed."""
        if route.reader is not None and request.method in route.methods:
            # No CORS: reading is for the site's own server and pages, never another origin.
            return self._read(route.reader, request)
        prepared = self.prepare(route, request)
        if not (prepared.batch.events or prepared.batch.rejections):
            return self._with_cors(prepared.respond([]), request, route)
        try:
            outcomes = self.store.commit(prepared.batch, self.config.commit_timeout)
        except (StoreUnavailable, FutureTimeout, OSError) as exc:
            logger.warning("fp-collect store unavailable: %s", self._why_unavailable(exc))
            return self._with_cors(prepared.unavailable, request, route)
        return self._with_cors(prepared.respond(outcomes), request, route)

    async def handle_async(self, route: Route, request: Request) -> Response:
        """Like :meth:`handle`, awaiting the commit without blocking the event loop."""
        if route.reader is not None and request.method in route.methods:
            # Store reads block: run them in a worker thread, never on the loop.
            return await asyncio.to_thread(self._read, route.reader, request)
        prepared = self.prepare(route, request)
        if not (prepared.batch.events or prepared.batch.rejections):
            return self._with_cors(prepared.respond([]), request, route)
        try:
            commit = self.store.submit(prepared.batch)
            outcomes = await _committed(commit, self.config.commit_timeout)
        except (StoreUnavailable, asyncio.TimeoutError, OSError) as exc:
            logger.warning("fp-collect store unavailable: %s", self._why_unavailable(exc))
            return self._with_cors(prepared.unavailable, request, route)
        return self._with_cors(prepared.respond(outcomes), request, route)

    def _why_unavailable(self, exc: BaseException) -> str:
        # A timeout's own text is empty.
        return str(exc) or f"not committed within commit_timeout ({self.config.commit_timeout:g} s)"

    def _read(self, reader: Reader, request: Request) -> Response:
        try:
            # Answered 503 within commit_timeout, as a write is, when the store is down.
            with within(self.config.commit_timeout):
                return reader(request)
        except StoreUnavailable as exc:
            logger.warning("fp-collect store unavailable for a read: %s", exc)
            body = responses.single_error(
                HTTPStatus.SERVICE_UNAVAILABLE, "store_unavailable", "The store is unavailable"
            )
            return responses.json_response(
                HTTPStatus.SERVICE_UNAVAILABLE, body, [("retry-after", "5")]
            )

    def close(self) -> None:
        """Flush and close the store."""
        self.store.close()

    # -- CORS ---------------------------------------------------------------------------

    def _origin_allowed(self, origin: str) -> bool:
        if origin in self._origins:
            return True
        # "*" echoes the caller's origin, with credentials: never an opaque "null" one
        # (sandboxed frames, file: pages) nor a value that is no single origin.
        return self._any_origin and "://" in origin and not any(c in origin for c in ", \t")

    def _preflight(self, route: Route, request: Request) -> Response:
        origin = request.headers.get("origin")
        # The read API is never offered to other origins: the sources' allowed origins
        # are about who may send events, and a read token belongs on the site's side.
        if origin is None or route.reader is not None or not self._origin_allowed(origin):
            body = responses.single_error(
                HTTPStatus.FORBIDDEN, "origin_not_allowed", "Origin not allowed"
            )
            return responses.json_response(HTTPStatus.FORBIDDEN, body)
        headers: HeaderList = [
            ("access-control-allow-methods", ", ".join(sorted(route.methods | {"OPTIONS"}))),
            ("access-control-max-age", _PREFLIGHT_MAX_AGE),
        ]
        requested = request.headers.get("access-control-request-headers")
        if requested:
            # Write keys are public and nothing is read back, so any header may be sent.
            headers.append(("access-control-allow-headers", requested[:1000]))
        return Response(HTTPStatus.NO_CONTENT, headers, b"")

    def _with_cors(self, response: Response, request: Request, route: Route) -> Response:
        origin = request.headers.get("origin")
        if origin is None or route.reader is not None or not self._origin_allowed(origin):
            return response
        # Echo the origin (never "*") so credentialed requests such as sendBeacon work.
        # Responses may be shared constants: build a new header list, never extend theirs.
        headers = [
            *response.headers,
            ("access-control-allow-origin", origin),
            ("access-control-allow-credentials", "true"),
            ("vary", "Origin"),
        ]
        return Response(response.status, headers, response.body)

    def _internal_error(self, request: Request) -> Prepared:
        received = self.pipeline.clock()
        rejection = RejectionRecord(
            source_id=None,
            reason="internal_error",
            message="the collector failed on this request",
            received_at=format_iso(received),
            endpoint=request.path,
            payload=recorded(request.body),
        )
        body = responses.single_error(
            HTTPStatus.BAD_REQUEST,
            "internal_error",
            "The request could not be processed; it was recorded",
        )
        return Prepared(
            Batch(rejections=[rejection]),
            lambda _o: responses.json_response(HTTPStatus.BAD_REQUEST, body),
            responses.json_response(HTTPStatus.BAD_REQUEST, body),
        )


async def _committed(commit: Pending, timeout: float) -> list[Outcome]:
    """Wait for the writer thread's ``commit`` on the event loop, at most ``timeout``.

    One loop future and one timer per request; the wake-up is shared (see
    :class:`_LoopWaker`). The commit itself is never cancelled, neither by the timeout
    nor by a client that went away: it is in the writer's hands, and a retry is
    absorbed by dedup.
    """
    if commit.done():  # a store that commits synchronously (memory://): nothing to wait for
        if commit.cancelled():
            raise StoreUnavailable("the commit was cancelled")
        return commit.result(0)
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[list[Outcome]] = loop.create_future()

    def expire() -> None:
        if not waiter.done():
            waiter.set_exception(asyncio.TimeoutError())

    commit.add_done_callback(functools.partial(_waker(loop).settled, waiter))
    timer = loop.call_later(timeout, expire)
    try:
        return await waiter
    finally:
        timer.cancel()


class _LoopWaker:
    """Hands the commits that writer threads settle to the waiters on one event loop.

    A writer settles a whole group of commits at once (~25 requests under load). Each
    waking its request's loop would cost a ``call_soon_threadsafe`` apiece (a self-pipe
    write and a loop turn). Here the first commit of a group schedules one drain and
    the others join its list; the drain, on the loop, settles them all.
    """

    __slots__ = ("_lock", "_loop", "_ready", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weakly: the waker is kept in a WeakKeyDictionary keyed by its loop.
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._ready: list[tuple[asyncio.Future[list[Outcome]], Pending]] = []
        self._scheduled = False  # a drain is scheduled and has not yet taken _ready

    def settled(self, waiter: asyncio.Future[list[Outcome]], commit: Pending) -> None:
        """``commit`` is settled (called in the thread that settled it)."""
        with self._lock:
            self._ready.append((waiter, commit))
            if self._scheduled:
                return  # the scheduled drain will take this one too
            self._scheduled = True
        loop = self._loop()
        if loop is not None:
            # A closed loop (RuntimeError) has nobody waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # on the loop
        with self._lock:
            ready, self._ready = self._ready, []
            # From here a newly settled commit schedules the next drain.
            self._scheduled = False
        for waiter, commit in ready:
            if waiter.done():  # timed out, or its client went away
                continue
            if commit.cancelled():
                waiter.set_exception(StoreUnavailable("the commit was cancelled"))
            elif (error := commit.exception(0)) is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(commit.result(0))


_wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWaker] = (
    weakref.WeakKeyDictionary()
)


def _waker(loop: asyncio.AbstractEventLoop) -> _LoopWaker:
    """The loop's waker (one per loop: loops run in their own threads)."""
    waker = _wakers.get(loop)
    if waker is None:
        waker = _wakers[loop] = _LoopWaker(loop)
    return waker


def _fixed(response: Response) -> Prepared:
    return Prepared(Batch(), lambda _outcomes: response, response)
