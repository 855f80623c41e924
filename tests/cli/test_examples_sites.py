"""The example sites: home page, and the page's own script's events really stored."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from starlette.testclient import TestClient
from werkzeug.test import Client

_serial = itertools.count()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TIMEOUT = 30  # seconds; guards against a hang only
RunCLI = Callable[..., Any]

# Runs the page's inline script under node with just enough of a browser around it:
# records every fetch, then submits the form / clicks the button.
BROWSER_STUB = r"""
const script = require("fs").readFileSync(0, "utf8");
const calls = [];
const handlers = [];
const element = (extra) => ({
  textContent: "",
  addEventListener: (type, handler) => handlers.push(handler),
  ...extra,
});
const elements = {
  signup: element({ elements: { plan: { value: "pro" } } }),
  buy: element({}),
  status: element({}),
};
const store = new Map();
globalThis.document = { title: "Example", referrer: "", getElementById: (id) => elements[id] };
globalThis.location = { pathname: "/", href: "http://127.0.0.1/" };
globalThis.localStorage = {
  getItem: (k) => store.get(k) ?? null,
  setItem: (k, v) => store.set(k, v),
};
globalThis.fetch = (url, init) => {
  calls.push({ url, method: init.method, headers: init.headers, body: init.body });
  return Promise.resolve({ ok: true, status: 200 });
};
(0, eval)(script);
for (const handler of handlers) handler({ preventDefault() {} });
setTimeout(() => process.stdout.write(JSON.stringify(calls)), 0);
"""


def load_example(
    name: str, monkeypatch: pytest.MonkeyPatch, storage: str, key: str | None = None
) -> ModuleType:
    """Import examples/<name>.py as a fresh module, configured through the environment."""
    monkeypatch.setenv("FP_COLLECT_STORAGE", storage)
    if key is None:
        monkeypatch.delenv("FP_COLLECT_WRITE_KEY", raising=False)
    else:
        monkeypatch.setenv("FP_COLLECT_WRITE_KEY", key)
    module_name = f"fp_collect_example_{name}_{next(_serial)}"
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Flask finds its root path through sys.modules.
    monkeypatch.setitem(sys.modules, module_name, module)
    spec.loader.exec_module(module)
    return module


def inline_script(page: str) -> str:
    match = re.search(r"<script>(.*?)</script>", page, re.S)
    assert match is not None, "no inline script"
    return match.group(1)


def browser_calls(page: str) -> list[dict[str, Any]]:
    """What the page's script sends, run under node; skipped where node is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    result = subprocess.run(
        [node, "-e", BROWSER_STUB],
        input=inline_script(page),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    calls: list[dict[str, Any]] = json.loads(result.stdout)
    return calls


def page_event(key: str = "example-write-key") -> str:
    """A page call shaped like the example's script (and analytics.js) sends it."""
    return json.dumps(
        {
            "name": "Home",
            "properties": {"path": "/"},
            "writeKey": key,
            "anonymousId": "anon-1",
            "messageId": "page-1",
            "timestamp": "2024-05-01T12:00:00.000Z",
            "sentAt": "2024-05-01T12:00:00.000Z",
            "context": {"page": {"path": "/", "url": "http://127.0.0.1/"}},
        }
    )


@pytest.fixture
def storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'site.db'}"


# -- Flask ------------------------------------------------------------------------------


@pytest.fixture
def flask_site(monkeypatch: pytest.MonkeyPatch, storage: str) -> Iterator[ModuleType]:
    module = load_example("flask_site", monkeypatch, storage)
    try:
        yield module
    finally:
        module.collector.close()


def test_flask_home_page(flask_site: ModuleType) -> None:
    response = Client(flask_site.app).get("/")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert "<script>" in page and "src=" not in page  # nothing loaded from elsewhere
    assert '"/collect/v1/"' in page and '"example-write-key"' in page
    assert '"Content-Type": "text/plain"' in page


def test_flask_stores_a_page_event_posted_like_the_script(
    flask_site: ModuleType, storage: str, cli: RunCLI
) -> None:
    client = Client(flask_site.app)
    response = client.post(
        "/collect/v1/p", data=page_event(), headers={"Content-Type": "text/plain"}
    )
    assert (response.status_code, response.get_json()) == (200, {"success": True})
    assert client.get("/collect/v1/nope").status_code == 404  # Flask's own 404
    flask_site.collector.close()

    [event] = cli(["events", "--storage", storage]).objects
    assert (event["type"], event["name"], event["messageId"]) == ("page", "Home", "page-1")
    assert "writeKey" not in event
    assert cli(["events", "--storage", storage, "--source", "flask-site"]).lines


def test_flask_page_script_events_are_stored(
    flask_site: ModuleType, storage: str, cli: RunCLI
) -> None:
    client = Client(flask_site.app)
    calls = browser_calls(client.get("/").get_data(as_text=True))
    assert [call["url"] for call in calls] == ["/collect/v1/p", "/collect/v1/t"]
    for call in calls:
        assert call["method"] == "POST"
        assert call["headers"] == {"Content-Type": "text/plain"}
        response = client.post(call["url"], data=call["body"], headers=call["headers"])
        assert response.status_code == 200, response.get_data(as_text=True)
    flask_site.collector.close()

    events = cli(["events", "--storage", storage, "--source", "flask-site"]).objects
    assert [(e["type"], e.get("name") or e.get("event")) for e in events] == [
        ("page", "Home"),
        ("track", "Signed Up"),
    ]
    assert events[1]["properties"] == {"plan": "pro"}
    assert events[0]["anonymousId"] == events[1]["anonymousId"]
    assert cli(["rejections", "--storage", storage]).lines == []


# -- Starlette --------------------------------------------------------------------------


@pytest.fixture
def starlette_site(monkeypatch: pytest.MonkeyPatch, storage: str) -> Iterator[ModuleType]:
    module = load_example("starlette_site", monkeypatch, storage)
    try:
        yield module
    finally:
        module.collector.close()


def test_starlette_home_page(starlette_site: ModuleType) -> None:
    with TestClient(starlette_site.app) as client:
        response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<script>" in page and "src=" not in page
    assert '"/collect/v1/"' in page and '"example-write-key"' in page
    assert "__WRITE_KEY__" not in page and "__STORAGE__" not in page


def test_starlette_stores_a_page_event_posted_like_the_script(
    starlette_site: ModuleType, storage: str, cli: RunCLI
) -> None:
    # The context manager runs the lifespan: the store is closed on the way out.
    with TestClient(starlette_site.app) as client:
        response = client.post(
            "/collect/v1/p", content=page_event(), headers={"Content-Type": "text/plain"}
        )
        assert (response.status_code, response.json()) == (200, {"success": True})
        assert client.get("/elsewhere").status_code == 404  # Starlette's own 404

    [event] = cli(["events", "--storage", storage, "--source", "starlette-site"]).objects
    assert (event["type"], event["name"], event["messageId"]) == ("page", "Home", "page-1")


def test_starlette_page_script_events_are_stored(
    starlette_site: ModuleType, storage: str, cli: RunCLI
) -> None:
    with TestClient(starlette_site.app) as client:
        calls = browser_calls(client.get("/").text)
        assert [call["url"] for call in calls] == ["/collect/v1/p", "/collect/v1/t"]
        for call in calls:
            response = client.post(call["url"], content=call["body"], headers=call["headers"])
            assert response.status_code == 200, response.text

    events = cli(["events", "--storage", storage]).objects
    assert [(e["type"], e.get("name") or e.get("event")) for e in events] == [
        ("page", "Home"),
        ("track", "Order Completed"),
    ]
    # The demo follows the README's own guidelines: nothing it sends is flagged.
    assert cli(["events", "--storage", storage, "--flagged"]).objects == []


HOSTILE_KEY = "</script><b>x"


def check_hostile_key(page: str, post: Callable[[str], int]) -> None:
    # The key is in the page, but cannot close the script block early.
    assert HOSTILE_KEY not in page and page.count("</script>") == 1
    assert HOSTILE_KEY in browser_calls(page)[0]["body"]
    assert post(page_event(HOSTILE_KEY)) == 200
    assert post(page_event()) == 400  # the default key is not accepted any more


def test_flask_write_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, storage: str
) -> None:
    module = load_example("flask_site", monkeypatch, storage, key=HOSTILE_KEY)
    try:
        client = Client(module.app)
        check_hostile_key(
            client.get("/").get_data(as_text=True),
            lambda body: (
                client.post(
                    "/collect/v1/p", data=body, headers={"Content-Type": "text/plain"}
                ).status_code
            ),
        )
    finally:
        module.collector.close()


def test_starlette_write_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, storage: str
) -> None:
    module = load_example("starlette_site", monkeypatch, storage, key=HOSTILE_KEY)
    try:
        with TestClient(module.app) as client:
            check_hostile_key(
                client.get("/").text,
                lambda body: (
                    client.post(
                        "/collect/v1/p", content=body, headers={"Content-Type": "text/plain"}
                    ).status_code
                ),
            )
    finally:
        module.collector.close()


# -- examples/run.sh ----------------------------------------------------------------------


@pytest.mark.parametrize(("site", "marker"), [("starlette", "Starlette"), ("flask", "Flask")])
def test_run_sh_serves_the_site_from_any_directory(
    site: str,
    marker: str,
    tmp_path: Path,
    free_port: int,
    child_env: dict[str, str],
    cli: RunCLI,
) -> None:
    # The virtualenv running this test already has fp-collect and both frameworks, so
    # run.sh must find them there and start at once, installing nothing.
    storage = f"sqlite:///{tmp_path / 'run.db'}"
    env = {**child_env, "PORT": str(free_port), "FP_COLLECT_STORAGE": storage, "VENV": sys.prefix}
    child = subprocess.Popen(
        ["bash", str(EXAMPLES / "run.sh"), site],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{free_port}/", timeout=5) as r:
                    page = r.read().decode()
                break
            except (urllib.error.URLError, OSError):
                if child.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert marker in page
        request = urllib.request.Request(
            f"http://127.0.0.1:{free_port}/collect/v1/p",
            data=page_event().encode(),
            headers={"Content-Type": "text/plain"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
    finally:
        child.terminate()
        try:
            output, _ = child.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            output, _ = child.communicate(timeout=10)
    assert "Installing" not in output
    for expected in (f"http://127.0.0.1:{free_port}/", "example-write-key", "curl -u"):
        assert expected in output
    assert f"fp-collect events --storage {storage}" in output
    assert [e["messageId"] for e in cli(["events", "--storage", storage]).objects] == ["page-1"]
