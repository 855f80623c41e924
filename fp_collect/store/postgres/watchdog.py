"""Client-side timeouts for psycopg connections whose server went silent."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from fp_collect.store.base import request_deadline
from fp_collect.store.postgres.sql import Connection


class Watch:
    """One connection being watched: shut down if it stays silent past ``deadline``.

    Made while working for a waiting request (writing for a caller of ``commit()``, see
    ``WriteQueue.commit_here``, or reading for the collector), the deadline never passes
    the time that request has, or ``floor`` seconds from now if that is later:
    ``cut_short`` tells whether it was that limit rather than the server's silence that
    ended the connection.
    """

    __slots__ = ("_cap", "_sock", "_wake", "deadline", "fired", "timeout")

    def __init__(
        self, conn: Connection, timeout: float, wake: Callable[[], None], floor: float = 0.0
    ) -> None:
        self.timeout = timeout
        cap = request_deadline()
        self._cap = None if cap is None else max(cap, time.monotonic() + floor)
        self._wake = wake
        self.deadline = self._capped(time.monotonic() + timeout)
        self.fired = False
        # A duplicate descriptor: it names this socket even if the connection closes
        # its own and the number is reused, so we can never shut down a stranger.
        self._sock = socket.socket(fileno=os.dup(conn.fileno()))

    def extend(self, statements: int = 1) -> None:
        """Statements are about to be sent: the server has ``timeout`` to answer each."""
        deadline = self._capped(time.monotonic() + self.timeout * statements)
        earlier = deadline < self.deadline
        self.deadline = deadline
        if earlier:
            # After a pipeline's longer allowance, one statement's: the watchdog may be
            # asleep until the old deadline.
            self._wake()

    def _capped(self, deadline: float) -> float:
        return deadline if self._cap is None else min(deadline, self._cap)

    @property
    def cut_short(self) -> bool:
        return self.fired and self.deadline == self._cap

    def silence(self) -> str:
        """Why the connection was ended, for the error raised after :meth:`fire`."""
        if self.cut_short:
            return "PostgreSQL did not answer within the time the request had (commit_timeout)"
        return f"PostgreSQL did not answer within {self.timeout:g} s"

    def fire(self) -> None:
        # shutdown() wakes the thread blocked on the socket with an error; psycopg then
        # marks the connection broken and we discard it. Nothing is freed under it.
        self.fired = True
        with suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._sock.close()


class Watchdog:
    """A thread that ends connections whose server stopped answering.

    psycopg has no client-side timeout for a query, and a stalled network (or a proxy
    that accepts bytes and never forwards them) is not detected by TCP itself: without
    this, a commit could wait forever.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watches: set[Watch] = set()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="fp-collect-pg-watch", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, conn: Connection, timeout: float, *, floor: float = 0.0) -> Iterator[Watch]:
        """Watch ``conn`` meanwhile: ``timeout`` per statement (see :meth:`Watch.extend`),
        within the calling write's deadline (but at least ``floor`` from now)."""
        watch = Watch(conn, timeout, self._wake, floor)
        with self._cond:
            self._watches.add(watch)
            self._cond.notify()
        try:
            yield watch
        finally:
            with self._cond:
                self._watches.discard(watch)
                watch.close()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                nearest: float | None = None
                for watch in list(self._watches):
                    if watch.deadline <= now:
                        watch.fire()
                        self._watches.discard(watch)
                    elif nearest is None or watch.deadline < nearest:
                        nearest = watch.deadline
                # A deadline moved later is found by waking at the old one and looking
                # again; one moved earlier wakes us (_wake).
                self._cond.wait(None if nearest is None else nearest - now)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()
