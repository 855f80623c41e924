"""In-process benchmark of the core pipeline against the parse floor.

Measures events/s through decode -> authenticate -> validate -> enrich (everything short
of the store) for a single track call and a 100-event batch, next to ``ujson.loads``
alone on the same bytes, and prints each as a ratio of that floor measured in the same
run. Absolute numbers drift between runs on a shared machine; the ratios are the claim.

A second baseline, ``loads+dumps``, parses the same bytes and serialises each event once
more, as every store keeps it: the two steps no collector that stores events as JSON
can skip. ``left at 0.40`` is what would remain, per event, for everything else
(validation, enrichment, identity, restrictions, the event record) if the core ran at
40 % of the parse floor, issue 6's target.

    python benchmarks/core_pipeline.py            # about 10 s
    python benchmarks/core_pipeline.py --quick    # a smoke run of a second or two
    python benchmarks/core_pipeline.py --profile  # and where prepare() spends its time
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import pstats
import timeit
import uuid
from collections.abc import Callable
from functools import partial

import ujson

from fp_collect import Collector, Request, Source
from fp_collect.decoding import dumps

WRITE_KEY = "bench-key"
HEADERS = {
    "authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(),
    "content-type": "application/json",
    "user-agent": "analytics-python/2.4.0",
}


def track_message(index: int) -> dict[str, object]:
    """A track call shaped like segment-analytics-python's (about 650 bytes)."""
    return {
        "type": "track",
        "userId": f"user-{index}",
        "anonymousId": None,
        "event": "Order Completed",
        "messageId": str(uuid.uuid4()),
        "timestamp": "2026-11-23T10:00:00.123+00:00",
        "properties": {
            "order_id": f"order-{index}",
            "revenue": 42.5,
            "currency": "EUR",
            "products": [{"sku": "sku-1", "name": "Towel", "price": 12.5, "quantity": 2}],
        },
        "context": {
            "library": {"name": "analytics-python", "version": "2.4.0"},
            # A title with " - ", as most pages have: the decoder must not scan it slowly.
            "page": {
                "path": "/checkout",
                "title": "Checkout - Example Shop",
                "url": "https://shop.example/checkout",
            },
            "locale": "en-US",
            "timezone": "Europe/Berlin",
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        },
        "integrations": {},
        "sentAt": "2026-11-23T10:00:00.456+00:00",
    }


def loads_and_dumps(body: bytes) -> None:
    """Parse ``body`` and serialise each event in it again, as the store keeps it."""
    value = ujson.loads(body)
    for event in value.get("batch", (value,)):
        dumps(event)


def best_seconds(function: Callable[[], object], number: int, repeat: int) -> float:
    return min(timeit.repeat(function, number=number, repeat=repeat)) / number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument(
        "--profile", action="store_true", help="also print a cProfile of prepare() per case"
    )
    args = parser.parse_args()
    number, repeat = (20, 2) if args.quick else (300, 5)

    collector = Collector(sources=[Source(write_key=WRITE_KEY, id="bench")], storage="memory://")
    single = dumps(track_message(0)).encode()
    batch = dumps(
        {"batch": [track_message(i) for i in range(100)], "sentAt": "2026-11-23T10:00:01.000Z"}
    ).encode()
    cases = [
        ("/v1/track single", "/v1/track", single, 1),
        ("/v1/batch x100", "/v1/batch", batch, 100),
    ]

    print(
        f"{'case':<18}{'bytes':>8}{'loads+dumps ev/s':>18}{'ratio':>7}{'left at 0.40':>14}"
        f"{'floor ev/s':>12}{'core ev/s':>12}{'ratio':>7}"
    )
    for label, path, body, events in cases:
        route = collector.route(path)
        assert route is not None
        request = Request("POST", path, "", HEADERS, body, "203.0.113.7")
        floor = best_seconds(partial(ujson.loads, body), number, repeat)
        serialised = best_seconds(partial(loads_and_dumps, body), number, repeat)
        prepare = partial(collector.prepare, route, request)
        core = best_seconds(prepare, number, repeat)
        # At 40 % of the floor an event may take floor / 0.40; parsing and serialising
        # take their share of that whatever else the core does.
        left_us = (floor / 0.40 - serialised) / events * 1e6
        print(
            f"{label:<18}{len(body):>8}{events / serialised:>18,.0f}{floor / serialised:>7.2f}"
            f"{left_us:>11.2f} us{events / floor:>12,.0f}{events / core:>12,.0f}"
            f"{floor / core:>7.2f}"
        )
        if args.profile:
            profile(prepare, label)
    collector.close()


def profile(function: Callable[[], object], label: str) -> None:
    """cProfile of ``function`` (the profiler roughly doubles the time of small calls:
    read the shares, not the absolute figures)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(2000 if "single" in label else 40):
        function()
    profiler.disable()
    print(f"\ncProfile of prepare() for {label}, by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
