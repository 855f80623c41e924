"""Collectors with a fake clock, and a way to send them requests without a server."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fp_collect import Collector, Request, Response, Source

KEY = "restrict-key"
BROWSER_UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Send = Callable[..., Response]


def sender(collector: Collector) -> Send:
    """``send(path, body, **headers)``: one request through the collector, answered."""

    def send(path: str, body: Any, headers: dict[str, str] | None = None) -> Response:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        route = collector.route(path)
        assert route is not None, path
        request = Request(
            "POST",
            path,
            "",
            {"content-type": "application/json", **(headers or {})},
            raw,
            "10.1.1.1",
        )
        return collector.handle(route, request)

    return send


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_collector(clock: Clock) -> Iterator[Callable[..., Collector]]:
    made: list[Collector] = []

    def make(*sources: Source, storage: str = "memory://") -> Collector:
        collector = Collector(
            sources=list(sources) or [Source(write_key=KEY, id="site")],
            storage=storage,
            clock=clock,
        )
        made.append(collector)
        return collector

    yield make
    for collector in made:
        collector.close()


def answer(response: Response) -> Any:
    return json.loads(response.body)
