"""What the benchmark's Starlette and Flask apps share (no web framework imported here).

``FP_BENCH_DB`` names the SQLite file and ``FP_BENCH_SYNCHRONOUS`` (``FULL``, the
default, or ``NORMAL``) its ``synchronous`` setting, for fp-collect and the hand-written
handler alike. ``FP_BENCH_STORE=memory`` gives fp-collect its in-memory store instead: not
durable, only to measure what everything but SQLite costs. With ``FP_BENCH_STORAGE_URL``
(a ``postgresql://`` or ``redis://`` URL with a schema or prefix of the run's own),
fp-collect stores there; the hand-written handler stays on SQLite.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
from concurrent.futures import Future
from typing import Literal

from fp_collect import Collector, Source

WRITE_KEY = "bench-key"
PATHS = ("/collect/v1/track", "/collect/v1/batch")
SUCCESS = b'{"success":true}'
INSERT = "INSERT INTO events (message_id, payload) VALUES (?, ?)"


def synchronous() -> Literal["FULL", "NORMAL"]:
    return "NORMAL" if os.environ.get("FP_BENCH_SYNCHRONOUS") == "NORMAL" else "FULL"


def collector() -> Collector:
    """The collector every fp-collect app mounts, on ``sqlite:///$FP_BENCH_DB``, with
    ``?synchronous=NORMAL`` when that is measured (or as the module docstring says)."""
    sources = [Source(write_key=WRITE_KEY, id="bench")]
    if os.environ.get("FP_BENCH_STORE") == "memory":
        return Collector(prefix="/collect", sources=sources, storage="memory://")
    if os.environ.get("FP_BENCH_STORAGE_URL"):
        return Collector(
            prefix="/collect", sources=sources, storage=os.environ["FP_BENCH_STORAGE_URL"]
        )
    storage = f"sqlite:///{os.environ['FP_BENCH_DB']}"
    if synchronous() == "NORMAL":
        storage += "?synchronous=NORMAL"
    return Collector(prefix="/collect", sources=sources, storage=storage)


def open_handwritten_db() -> sqlite3.Connection:
    """The hand-written handler's database: one table, WAL, the same ``synchronous``."""
    conn = sqlite3.connect(os.environ["FP_BENCH_DB"], check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous()}")
    conn.execute("CREATE TABLE IF NOT EXISTS events (message_id TEXT, payload TEXT NOT NULL)")
    return conn


Row = tuple[object, str]


class GroupCommit:
    """The hand-written handler's INSERTs, committed by one writer thread that takes every
    request waiting as one transaction (group commit): the best a hand-writer can do for
    throughput while still answering after the commit. Requests wait on the future
    :meth:`submit` returns."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._waiting: queue.SimpleQueue[tuple[list[Row], Future[None]]] = queue.SimpleQueue()
        threading.Thread(target=self._write, name="group-commit", daemon=True).start()

    def submit(self, rows: list[Row]) -> Future[None]:
        done: Future[None] = Future()
        self._waiting.put((rows, done))
        return done

    def _write(self) -> None:
        while True:
            group = [self._waiting.get()]
            while not self._waiting.empty():
                group.append(self._waiting.get())
            try:
                self._conn.executemany(INSERT, [row for rows, _ in group for row in rows])
                self._conn.commit()
            except sqlite3.Error as exc:
                self._conn.rollback()
                for _, done in group:
                    done.set_exception(exc)
            else:
                for _, done in group:
                    done.set_result(None)
