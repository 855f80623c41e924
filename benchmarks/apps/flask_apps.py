"""The three Flask apps of the HTTP benchmark, served by gunicorn (``'flask_apps:bare()'``).

The same four as :mod:`starlette_apps`: ``bare`` (read the body, answer 200),
``handwritten`` (``json.loads``, INSERT per event, COMMIT per request), ``grouped`` (the
same, committed by a writer thread a group of requests at a time; under gunicorn's one sync
worker a group is one request) and ``fp_collect`` (``init_app`` on a one-route site, on
SQLite).
"""

from __future__ import annotations

import json
import sqlite3
import threading

from common import INSERT, PATHS, SUCCESS, GroupCommit, collector, open_handwritten_db
from flask import Flask, Response, request

from fp_collect.adapters.wsgi import init_app


def bare() -> Flask:
    app = Flask(__name__)

    def collect() -> Response:
        request.get_data()
        return Response(SUCCESS, mimetype="application/json")

    for path in PATHS:
        app.add_url_rule(path, path, collect, methods=["POST"])
    return app


def handwritten() -> Flask:
    app = Flask(__name__)
    # A connection per thread, as a hand-writer would under gunicorn's gthread worker
    # (``--flask-threads``): one shared connection would interleave the threads'
    # transactions. Under the sync worker this is one connection.
    local = threading.local()

    def connection() -> sqlite3.Connection:
        if not hasattr(local, "conn"):
            local.conn = open_handwritten_db()
        conn: sqlite3.Connection = local.conn
        return conn

    def collect() -> Response:
        conn = connection()
        data = json.loads(request.get_data())
        events = data.get("batch", [data])
        conn.executemany(INSERT, [(e.get("messageId"), json.dumps(e)) for e in events])
        conn.commit()
        return Response(SUCCESS, mimetype="application/json")

    for path in PATHS:
        app.add_url_rule(path, path, collect, methods=["POST"])
    return app


def grouped() -> Flask:
    app = Flask(__name__)
    writer = GroupCommit(open_handwritten_db())

    def collect() -> Response:
        data = json.loads(request.get_data())
        events = data.get("batch", [data])
        writer.submit([(e.get("messageId"), json.dumps(e)) for e in events]).result()
        return Response(SUCCESS, mimetype="application/json")

    for path in PATHS:
        app.add_url_rule(path, path, collect, methods=["POST"])
    return app


def fp_collect() -> Flask:
    app = Flask(__name__)
    app.add_url_rule("/", "home", lambda: "the site itself")
    init_app(app, collector=collector())
    return app
