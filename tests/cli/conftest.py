"""Shared helpers for the CLI and example tests: real stores written through a Collector."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from fp_collect import Collector, Request, Source
from fp_collect.cli import main
from fp_collect.timestamps import parse_iso

SUBPROCESS_TIMEOUT = 30  # guards against a hang only; nothing asserts on time

KEY_A, KEY_B = "key-a", "key-b"
EARLY = "2024-05-01T10:00:00.000Z"
LATE = "2024-05-01T12:00:00.000Z"


# Test modules cannot import this file (importlib import mode), so what they share is
# offered as fixtures. The store_url fixture's two instants, for --since tests:
#   EARLY = 2024-05-01T10:00:00.000Z, LATE = 2024-05-01T12:00:00.000Z


def sqlite_url(path: Path) -> str:
    """``sqlite:///`` plus an absolute path: four slashes, as open_store expects."""
    return f"sqlite:///{path}"


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without any FP_COLLECT_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FP_COLLECT_")}
    env.update(extra)
    return env


class Clock:
    """An injectable clock: tests move it to control ``received_at``."""

    def __init__(self, iso: str) -> None:
        self.now = self.at(iso)

    @staticmethod
    def at(iso: str) -> float:
        seconds = parse_iso(iso)
        assert seconds is not None
        return seconds

    def __call__(self) -> float:
        return self.now


def post(collector: Collector, path: str, body: object, *, key: str | None = None) -> int:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = basic(key)
    route = collector.route(path)
    assert route is not None, path
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return collector.handle(route, Request("POST", path, headers=headers, body=raw)).status.value


@dataclass
class CLIResult:
    status: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    @property
    def objects(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.lines]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Iterator[object]:
    """Run ``fp-collect`` in-process: ``cli(["events", ...], env={...})``.

    The environment is empty unless given, so the caller's FP_COLLECT_* never leak in.
    Returns a :class:`CLIResult` (status, out, err, lines, objects).
    """

    def run(argv: Sequence[str], env: Mapping[str, str] | None = None) -> CLIResult:
        status = main(list(argv), environ={} if env is None else env)
        captured = capsys.readouterr()
        return CLIResult(status, captured.out, captured.err)

    yield run


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """A SQLite store holding events and rejections of two sources at two times.

    EARLY: site-a track "Signed Up" (m1), site-a page "Home" (m2), site-b track "Bought" (m3)
           a bad key (invalid_write_key), site-a track without event (missing_event)
    LATE:  site-b identify (m4), a duplicate of m1 (duplicate_message_id)
    """
    url = sqlite_url(tmp_path / "e.db")
    clock = Clock(EARLY)
    collector = Collector(
        sources=[Source(write_key=KEY_A, id="site-a"), Source(write_key=KEY_B, id="site-b")],
        storage=url,
        clock=clock,
    )
    try:
        track = {"userId": "u1", "event": "Signed Up", "messageId": "m1", "properties": {"é": 1}}
        assert post(collector, "/v1/track", track, key=KEY_A) == 200
        page = {"anonymousId": "a1", "name": "Home", "messageId": "m2"}
        assert post(collector, "/v1/page", page, key=KEY_A) == 200
        bought = {"userId": "u2", "event": "Bought", "messageId": "m3"}
        assert post(collector, "/v1/track", bought, key=KEY_B) == 200
        assert post(collector, "/v1/track", {"userId": "u9", "event": "X"}, key="nope") == 400
        assert post(collector, "/v1/track", {"userId": "u1"}, key=KEY_A) == 400
        clock.now = Clock.at(LATE)
        identify = {"userId": "u2", "traits": {"plan": "pro"}, "messageId": "m4"}
        assert post(collector, "/v1/identify", identify, key=KEY_B) == 200
        assert post(collector, "/v1/track", track, key=KEY_A) == 200  # a duplicate
    finally:
        collector.close()
    return url


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def child_env() -> dict[str, str]:
    """An environment for child processes with no FP_COLLECT_* setting leaking in."""
    return clean_env()


@pytest.fixture
def run_module(child_env: dict[str, str]) -> object:
    """Run ``python -m fp_collect ARGS`` in a child process, with a bounded wait."""

    def run(
        args: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fp_collect", *args],
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT,
            env=dict(child_env if env is None else env),
            cwd=cwd,
            check=False,
        )

    return run
