"""Mount fp-collect in any ASGI app: Starlette, FastAPI, or a bare ASGI server.

Pure ASGI (no ``BaseHTTPMiddleware``): paths that are not collection routes pass
straight through, their body unread. The body of a collection request is read up to
the route's limit; commits are awaited, so the event loop never blocks on storage.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

from fp_collect import responses
from fp_collect.collector import Collector
from fp_collect.dialects import Route
from fp_collect.http import Request, Response, content_length

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_NOT_FOUND = (
    b'{"Error":"Not Found","Message":"no collection endpoint here","Details":"",'
    b'"code":"not_found","message":"no collection endpoint here"}'
)


class CollectorMiddleware:
    """ASGI middleware that serves the collection routes in front of ``app``.

    ::

        from starlette.applications import Starlette
        from fp_collect import Collector, Source
        from fp_collect.adapters.asgi import CollectorMiddleware

        # Built here, a bad configuration fails at import, not on the first request.
        collector = Collector(sources=[Source(write_key="...")], storage="sqlite:///events.db")
        app = Starlette(routes=[...])
        app.add_middleware(CollectorMiddleware, collector=collector)

    :param app: the host application; None makes a standalone collector app that
        answers 404 for every other path (see :func:`collector_app`).
    :param collector: a ready :class:`~fp_collect.Collector`; otherwise ``options`` are
        passed to build one (``sources``, ``storage``, ``prefix``, ...).
    """

    def __init__(
        # Positional-only, as Starlette's add_middleware passes it, so that its typing
        # accepts this class (``app=`` could otherwise also arrive in ``options``).
        self,
        app: ASGIApp | None,
        /,
        *,
        collector: Collector | None = None,
        **options: Any,
    ) -> None:
        self.app = app
        self.collector = collector if collector is not None else Collector(**options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._not_ours(scope, receive, send)
            return
        path = _relative_path(scope)
        route = self.collector.route(path)
        if route is None:
            await self._not_ours(scope, receive, send)
            return
        try:
            request = await _read_request(scope, receive, route, path)
        except ClientGone:
            # Nothing of its body is processed. An answer still goes out (servers drop it)
            # because middleware around this app may insist on one.
            await _send_response(send, responses.unreadable_body("the client went away"))
            return
        response = await self.collector.handle_async(route, request)
        await _send_response(send, response)

    async def _not_ours(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is not None:
            if scope["type"] == "lifespan":
                await self.app(scope, receive, self._closing_on_shutdown(send))
            else:
                await self.app(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            # A standalone collector has no websocket endpoint: refuse the handshake.
            await receive()
            await send({"type": "websocket.close", "code": 1000})
        elif scope["type"] == "http":
            await _send_response(
                send,
                Response(HTTPStatus.NOT_FOUND, [("content-type", "application/json")], _NOT_FOUND),
            )

    def _closing_on_shutdown(self, send: Send) -> Send:
        """Flush the store once the host app has finished shutting down."""

        async def wrapped(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                self.collector.close()
            await send(message)

        return wrapped

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.collector.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def collector_app(*, collector: Collector | None = None, **options: Any) -> CollectorMiddleware:
    """A standalone ASGI app serving only the collection routes, for ``Mount`` or a server.

    ::

        from starlette.routing import Mount
        routes = [Mount("/collect", app=collector_app(sources=[...]))]
    """
    return CollectorMiddleware(None, collector=collector, **options)


def _relative_path(scope: Scope) -> str:
    """The path below the app's mount point. Starlette's ``Mount`` and current servers
    keep the full path in ``path`` and the mount point in ``root_path``."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        return path[len(root_path) :] or "/"
    return path


async def _read_request(scope: Scope, receive: Receive, route: Route, path: str) -> Request:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    client = scope.get("client")
    limit = route.max_body_bytes
    body, too_large = b"", False
    if scope["method"] in ("POST", "PUT", "PATCH") and limit > 0:
        declared = content_length(headers)
        if declared is not None and declared > limit:
            too_large = True  # answered from Content-Length, nothing read
        else:
            body, too_large = await _read_body(receive, limit)
    return Request(
        method=scope["method"],
        path=path,
        query=scope.get("query_string", b"").decode("latin-1"),
        headers=headers,
        body=body,
        client=client[0] if client else None,
        body_too_large=too_large,
    )


class ClientGone(Exception):
    """The client disconnected before its request body ended."""


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            # A cut-off body may still parse; storing it would answer nobody, and the
            # client's retry would then store the event twice if it carries no messageId.
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", True
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks), False


async def _send_response(send: Send, response: Response) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": response.status.value,
            "headers": [
                (name.encode("latin-1"), value.encode("latin-1"))
                for name, value in (*response.headers, ("content-length", str(len(response.body))))
            ],
        }
    )
    await send({"type": "http.response.body", "body": response.body})
