"""Mount fp-collect in any WSGI app; Flask in one line with :func:`init_app`.

Built on werkzeug's input-stream helpers, which never read past ``Content-Length``
and stop a chunked body at the route's limit.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

try:
    from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge
    from werkzeug.wsgi import get_input_stream
except ImportError as exc:  # say which extra brings it, as the stores do
    raise ImportError(
        "fp_collect.adapters.wsgi needs werkzeug: install fp-collect's 'flask' extra"
        " (pip install 'fp-collect[flask]', or '.[flask]' in a checkout)"
    ) from exc

from fp_collect import responses
from fp_collect.collector import Collector
from fp_collect.dialects import Route
from fp_collect.http import Request, content_length

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from flask import Flask


class CollectorMiddleware:
    """WSGI middleware serving the collection routes in front of ``app``.

    ::

        from fp_collect import Source
        from fp_collect.adapters.wsgi import CollectorMiddleware

        app.wsgi_app = CollectorMiddleware(app.wsgi_app, sources=[Source(write_key="...")])

    :param app: the host WSGI application; every other path goes to it untouched.
    :param collector: a ready :class:`~fp_collect.Collector`; otherwise ``options``
        build one (``sources``, ``storage``, ``prefix``, ...).
    """

    def __init__(
        self, app: WSGIApplication, *, collector: Collector | None = None, **options: Any
    ) -> None:
        self.app = app
        self.collector = collector if collector is not None else Collector(**options)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        route = self.collector.route(path)
        if route is None:
            return self.app(environ, start_response)
        try:
            request = _read_request(environ, route, path)
        except BodyUnreadable as exc:
            # Nothing of it is processed: a client that left gets no answer and retries.
            response = responses.unreadable_body(str(exc))
        else:
            response = self.collector.handle(route, request)
        start_response(
            response.status_line,
            [*response.headers, ("content-length", str(len(response.body)))],
        )
        return [response.body]


def init_app(app: Flask, **options: Any) -> Collector:
    """Mount the collector in a Flask app and return it.

    ::

        app = Flask(__name__)
        collector = init_app(app, sources=[Source(write_key="...")],
                             storage="sqlite:///events.db")

    The collector is also kept as ``app.extensions["fp_collect"]``. WSGI has no
    shutdown hook, so the store is closed when the interpreter exits (every request
    has already waited for its own commit; this only releases the writer).
    """
    middleware = CollectorMiddleware(app.wsgi_app, **options)
    app.wsgi_app = middleware  # type: ignore[method-assign]
    app.extensions["fp_collect"] = middleware.collector
    atexit.register(middleware.collector.close)
    return middleware.collector


class BodyUnreadable(Exception):
    """The request body could not be read whole: broken chunked framing, or the client
    went away before sending all of it."""


def _read_request(environ: WSGIEnvironment, route: Route, path: str) -> Request:
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers[key[5:].replace("_", "-").lower()] = value
    if environ.get("CONTENT_TYPE"):
        headers["content-type"] = environ["CONTENT_TYPE"]
    if environ.get("CONTENT_LENGTH"):
        headers["content-length"] = environ["CONTENT_LENGTH"]
    method = environ.get("REQUEST_METHOD", "GET").upper()
    limit = route.max_body_bytes
    body, too_large = b"", False
    if method in ("POST", "PUT", "PATCH") and limit > 0:
        declared = content_length(headers)
        if declared is not None and declared > limit:
            too_large = True  # answered from Content-Length, nothing read
        else:
            try:
                # limit + 1: for a de-chunked body (wsgi.input_terminated, as gunicorn and
                # werkzeug's server give) the stream is capped at exactly this, and the one
                # extra byte is how an over-size body is told from one that just fits.
                stream = get_input_stream(environ, max_content_length=limit + 1)
                body = stream.read(limit + 1)
            except RequestEntityTooLarge:
                too_large = True
            except ClientDisconnected as exc:
                # werkzeug raises it for a client gone mid-body and, wrapping the server's
                # error, for broken chunked framing ("Invalid chunk header"): say which.
                cause = exc.__cause__ or exc.__context__
                reason = (
                    "the client went away before the body ended"
                    if cause is None
                    else f"the body could not be read: {cause}"
                )
                raise BodyUnreadable(reason[:200]) from exc
            except (OSError, ValueError) as exc:  # a server's own stream, unwrapped
                raise BodyUnreadable(f"the body could not be read: {exc}"[:200]) from exc
            if len(body) > limit:
                body, too_large = b"", True
            elif declared is not None and len(body) < declared:
                raise BodyUnreadable("the body ended before its Content-Length")
    return Request(
        method=method,
        path=path,
        query=environ.get("QUERY_STRING", ""),
        headers=headers,
        body=body,
        client=environ.get("REMOTE_ADDR"),
        body_too_large=too_large,
    )
