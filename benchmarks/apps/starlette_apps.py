"""The three Starlette apps of the HTTP benchmark, served by uvicorn with ``--factory``.

* ``bare``: reads the body and answers 200 -- the ceiling;
* ``handwritten``: what one would write by hand: ``json.loads``, an INSERT per event and
  one COMMIT per request (WAL, the same ``synchronous`` as fp-collect), blocking the event
  loop as a plain ``async def`` endpoint does;
* ``grouped``: the same, but its INSERTs are committed by a writer thread that takes every
  request waiting as one transaction (group commit), the loop awaiting the commit;
* ``fp_collect``: the collector as middleware in front of a one-route site, on SQLite,
  answering only after the commit.
"""

from __future__ import annotations

import asyncio
import json

from common import INSERT, PATHS, SUCCESS, GroupCommit, collector, open_handwritten_db
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fp_collect.adapters.asgi import CollectorMiddleware


def bare() -> Starlette:
    async def collect(request: Request) -> Response:
        await request.body()
        return Response(SUCCESS, media_type="application/json")

    return Starlette(routes=[Route(path, collect, methods=["POST"]) for path in PATHS])


def handwritten() -> Starlette:
    conn = open_handwritten_db()

    async def collect(request: Request) -> Response:
        data = json.loads(await request.body())
        events = data.get("batch", [data])
        conn.executemany(INSERT, [(e.get("messageId"), json.dumps(e)) for e in events])
        conn.commit()
        return Response(SUCCESS, media_type="application/json")

    return Starlette(routes=[Route(path, collect, methods=["POST"]) for path in PATHS])


def grouped() -> Starlette:
    writer = GroupCommit(open_handwritten_db())

    async def collect(request: Request) -> Response:
        data = json.loads(await request.body())
        events = data.get("batch", [data])
        await asyncio.wrap_future(
            writer.submit([(e.get("messageId"), json.dumps(e)) for e in events])
        )
        return Response(SUCCESS, media_type="application/json")

    return Starlette(routes=[Route(path, collect, methods=["POST"]) for path in PATHS])


def fp_collect() -> Starlette:
    async def home(request: Request) -> Response:
        return PlainTextResponse("the site itself")

    return Starlette(
        routes=[Route("/", home)],
        middleware=[Middleware(CollectorMiddleware, collector=collector())],
    )
