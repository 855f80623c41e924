"""Where the time goes, from a py-spy profile that ``http_load.py --profile DIR`` recorded.

Reads py-spy's raw (collapsed-stack) output, recorded with ``--threads`` and without
``--idle`` (so a sample is a thread on the CPU), and prints: each thread's share, the
share of the stages of a request (inclusive: a sample counts for the deepest stage on
its stack), and the source lines with the most self time.

    python benchmarks/profile_summary.py prof/starlette-fp-collect-track.txt --seconds 10
"""

from __future__ import annotations

import argparse
import linecache
import re
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (stage, function names that start it). A sample belongs to the deepest stage found on
# its stack, so "parse" inside "core pipeline" counts as parse only.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("server: uvloop's C loop (sockets, epoll, scheduling)", ("Runner.run (asyncio/runners",)),
    ("server: uvicorn's protocol (httptools callbacks)", ("HttpToolsProtocol", "httptools_impl")),
    ("server: gunicorn/werkzeug (outside the app)", ("Arbiter.run", "SyncWorker.run")),
    ("Starlette/Flask stack above the adapter", ("run_asgi", "Flask.wsgi_app", "Flask.__call__")),
    ("adapter: request in (headers, body read)", ("_read_request",)),
    ("adapter: response out", ("_send_response", "start_response")),
    ("core: collector.prepare (dialect)", ("Collector.prepare",)),
    ("core: decode (body, content type, gzip)", ("Pipeline.read_body",)),
    ("core: parse_json (ujson + checks)", ("parse_json",)),
    ("core: authenticate", ("_source", "KeyRing.resolve", "basic_username")),
    ("core: normalise/validate", ("normalise_message",)),
    ("core: enrich (timestamps, context)", ("Pipeline.enrich", "Pipeline.incoming")),
    ("core: rules + event-name guidelines", ("Pipeline.apply_rules",)),
    ("core: identity_op", ("identity_op",)),
    ("core: encode_event (ujson.dumps)", ("encode_event",)),
    ("core: EventRecord/Batch construction", ("EventRecord.__init__", "__create_fn__")),
    ("handoff: store.submit + future wake-up", (
        "SQLiteStore.submit", "wrap_future", "_chain_future", "_call_set_state",
        "_copy_future_state", "shield", "wait_for",
    )),
    ("answer: prepared.respond + CORS", ("_with_cors", "respond")),
    ("writer: group commit (BEGIN/COMMIT/savepoints)", ("_commit_group",)),
    ("writer: per-event SQL (dedup, insert)", ("_apply_event", "SQLiteStore._apply")),
    ("writer: identity resolution SQL", ("resolve_profile", "resolve_session", "SQLGraph")),
    ("writer: set_result (wakes the loop)", ("Future.set_result",)),
]  # fmt: skip

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+):(?P<line>\d+)\)$")


def parse(path: Path) -> list[tuple[list[str], int]]:
    samples = []
    for raw in path.read_text().splitlines():
        stack, _, count = raw.rpartition(" ")
        if stack:
            samples.append((stack.split(";"), int(count)))
    return samples


def stage_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        for stage, starts in STAGES:
            if any(start in frame for start in starts):
                return stage
    return "other"


def source(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    name = match["file"]
    candidates = [REPO / name, *(Path(p) / name for p in sys.path)]
    text = next(
        (linecache.getline(str(c), int(match["line"])) for c in candidates if c.exists()), ""
    )
    return f"{frame}  | {text.strip()[:70]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--rate", type=float, default=200, help="py-spy samples/s")
    parser.add_argument("--seconds", type=float, default=10, help="the recording's length")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    samples = parse(args.profile)
    total = sum(n for _, n in samples)
    possible = args.rate * args.seconds
    print(f"{total} on-CPU samples = {total / possible:.0%} of one core over {args.seconds:g} s")

    threads: Counter[str] = Counter()
    stages: dict[str, Counter[str]] = {}
    lines: Counter[str] = Counter()
    for stack, n in samples:
        thread = stack[0].split(": ", 1)[-1] if stack[0].startswith("thread") else "?"
        name = "sqlite writer" if "fp-collect-sqlite" in thread else "main (event loop)"
        threads[name] += n
        stages.setdefault(name, Counter())[stage_of(stack)] += n
        lines[stack[-1]] += n

    print("\nthreads (py-spy counts a thread waiting on disk I/O, e.g. in COMMIT, as active)")
    for name, n in threads.most_common():
        print(f"  {n / total:6.1%}  {name}")
    for name, counts in stages.items():
        print(f"\nstages of the {name} thread, as shares of its samples")
        print("(each sample counted once, in the deepest stage on its stack)")
        for stage, n in counts.most_common():
            print(f"  {n / threads[name]:6.1%}  {stage}")
    print(f"\nself time, top {args.top} lines")
    for frame, n in lines.most_common(args.top):
        print(f"  {n / total:6.1%}  {source(frame)}")


if __name__ == "__main__":
    main()
