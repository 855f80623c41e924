"""The CLI as a real process: ``python -m fp_collect``, ``serve`` for real, closed pipes."""

from __future__ import annotations

import base64
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from fp_collect import Collector, Request, Source

TIMEOUT = 30  # seconds; guards against a hang only, nothing asserts on time
RunCLI = Callable[..., Any]
RunModule = Callable[..., "subprocess.CompletedProcess[str]"]


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"  # an absolute path, hence four slashes


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def line_reader(stream: IO[str]) -> queue.Queue[str | None]:
    """Lines of ``stream`` from a daemon thread, so reads can time out; None at EOF."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def read_until(lines: queue.Queue[str | None], pattern: str, seen: list[str]) -> re.Match[str]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no line matching {pattern!r} in {seen!r}")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            raise AssertionError(f"output ended before {pattern!r}: {seen!r}")
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match


def post_until_up(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """POST, retrying while the server is still starting to listen."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def stop_gracefully(server: subprocess.Popen[str]) -> None:
    server.terminate()
    # uvicorn shuts down (lifespan closes the store), then re-raises the signal it caught.
    assert server.wait(timeout=TIMEOUT) in (0, -signal.SIGTERM)


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start child processes that are always stopped (terminate, then kill) afterwards."""
    children: list[subprocess.Popen[str]] = []

    def start(args: list[str], **options: Any) -> subprocess.Popen[str]:
        child = subprocess.Popen(args, text=True, **options)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=10)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()


def test_python_dash_m_help(run_module: RunModule) -> None:
    result = run_module(["--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fp-collect")
    for command in ("serve", "events", "rejections"):
        assert command in result.stdout


def test_python_dash_m_reports_errors_without_a_traceback(
    run_module: RunModule, tmp_path: Path
) -> None:
    result = run_module(["events", "--storage", sqlite_url(tmp_path / "none.db")])
    assert result.returncode == 2
    assert result.stdout == ""
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "none.db").exists()


def test_serve_generates_a_key_accepts_events_and_stores_them(
    spawn: Callable[..., subprocess.Popen[str]],
    free_port: int,
    child_env: dict[str, str],
    tmp_path: Path,
    cli: RunCLI,
) -> None:
    url = sqlite_url(tmp_path / "served.db")
    server = spawn(
        [sys.executable, "-m", "fp_collect", "serve", "--port", str(free_port), "--storage", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=child_env,
        cwd=tmp_path,
    )
    assert server.stdout is not None
    lines = line_reader(server.stdout)
    seen: list[str] = []
    key = read_until(lines, r"write key:\s+(\S+)", seen).group(1)
    read_until(lines, r"curl .*/v1/track", seen)
    assert len(key) >= 24
    assert any("generated" in line for line in seen)

    track = {"userId": "u1", "event": "Served", "messageId": "served-1"}
    status, body = post_until_up(
        f"http://127.0.0.1:{free_port}/v1/track",
        json.dumps(track).encode(),
        {"Authorization": basic(key), "Content-Type": "application/json"},
    )
    assert (status, json.loads(body)) == (200, {"success": True})
    status, _ = post_until_up(
        f"http://127.0.0.1:{free_port}/v1/track",
        json.dumps(track).encode(),
        {"Authorization": basic("wrong-key"), "Content-Type": "application/json"},
    )
    assert status == 400

    stop_gracefully(server)

    events = cli(["events", "--storage", url])
    assert events.status == 0
    assert [(e["event"], e["messageId"], e["userId"]) for e in events.objects] == [
        ("Served", "served-1", "u1")
    ]
    rejections = cli(["rejections", "--storage", url])
    assert [r["reason"] for r in rejections.objects] == ["invalid_write_key"]


def test_serve_takes_key_prefix_and_origin_from_the_environment(
    spawn: Callable[..., subprocess.Popen[str]],
    free_port: int,
    child_env: dict[str, str],
    tmp_path: Path,
    cli: RunCLI,
) -> None:
    url = sqlite_url(tmp_path / "env.db")
    env = {
        **child_env,
        "FP_COLLECT_STORAGE": url,
        "FP_COLLECT_PORT": str(free_port),
        "FP_COLLECT_PREFIX": "/collect",
        "FP_COLLECT_WRITE_KEY": "env-key",
        "FP_COLLECT_ALLOWED_ORIGINS": "https://shop.example, https://blog.example",
    }
    server = spawn(
        [sys.executable, "-m", "fp_collect", "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=tmp_path,
    )
    assert server.stdout is not None
    lines = line_reader(server.stdout)
    seen: list[str] = []
    assert read_until(lines, r"write key:\s+(\S+)", seen).group(1) == "env-key"
    read_until(lines, r"events --storage", seen)
    assert not any("generated" in line for line in seen)
    assert any(f"http://127.0.0.1:{free_port}/collect/v1/" in line for line in seen)

    page = {"writeKey": "env-key", "anonymousId": "a1", "name": "Home"}
    endpoint = f"http://127.0.0.1:{free_port}/collect/v1/p"
    # A page's beacon: a browser's user agent (Python-urllib would be taken for a bot).
    headers = {
        "Content-Type": "text/plain",
        "Origin": "https://blog.example",
        "User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    }
    status, _ = post_until_up(endpoint, json.dumps(page).encode(), headers)
    assert status == 200
    headers["Origin"] = "https://evil.example"
    status, _ = post_until_up(endpoint, json.dumps(page).encode(), headers)
    assert status == 403
    stop_gracefully(server)

    assert [e["name"] for e in cli(["events", "--storage", url]).objects] == ["Home"]
    reasons = [r["reason"] for r in cli(["rejections", "--storage", url]).objects]
    assert reasons == ["origin_not_allowed"]


def test_serve_without_uvicorn_says_what_to_install(
    cli: RunCLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # makes `import uvicorn` fail
    result = cli(["serve", "--storage", "memory://"])
    assert result.status == 2
    assert "fp-collect[starlette]" in result.err
    assert "Traceback" not in result.err


def test_serve_rejects_a_bad_port_and_a_bad_key(cli: RunCLI) -> None:
    result = cli(["serve", "--port", "70000"])
    assert result.status == 2 and "--port" in result.err
    result = cli(["serve", "--storage", "memory://"], env={"FP_COLLECT_PORT": "http"})
    assert result.status == 2 and "FP_COLLECT_PORT" in result.err
    result = cli(["serve", "--storage", "memory://", "--write-key", "has:colon"])
    assert result.status == 2 and "must not contain ':'" in result.err
    result = cli(["serve", "--storage", "memory://", "--prefix", "/a?b"])
    assert result.status == 2 and "prefix" in result.err


def test_a_closed_pipe_ends_output_quietly(
    spawn: Callable[..., subprocess.Popen[str]], child_env: dict[str, str], tmp_path: Path
) -> None:
    url = sqlite_url(tmp_path / "many.db")
    collector = Collector(sources=[Source(write_key="k")], storage=url)
    try:
        route = collector.route("/v1/batch")
        assert route is not None
        for start in range(0, 1200, 300):
            batch = {
                "batch": [
                    {"type": "track", "userId": f"u{i}", "event": "Many", "properties": {"i": i}}
                    for i in range(start, start + 300)
                ]
            }
            request = Request(
                "POST",
                "/v1/batch",
                headers={"content-type": "application/json", "authorization": basic("k")},
                body=json.dumps(batch).encode(),
            )
            assert collector.handle(route, request).status == 200
    finally:
        collector.close()

    # More output than a pipe holds, so the writer is still writing when the reader goes.
    reader = spawn(
        [sys.executable, "-m", "fp_collect", "events", "--storage", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env,
    )
    assert reader.stdout is not None and reader.stderr is not None
    first = reader.stdout.readline()
    assert json.loads(first)["event"] == "Many"
    reader.stdout.close()
    assert reader.wait(timeout=TIMEOUT) == 0
    assert reader.stderr.read() == ""
