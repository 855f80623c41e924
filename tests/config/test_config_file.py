"""Workspaces and sources from a TOML file, and the dev server's --config."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from fp_collect import Collector, CollectorConfig, Request, Source
from fp_collect.cli import main as cli
from fp_collect.config import Workspace
from fp_collect.errors import ConfigError
from fp_collect.rules import CopyContextField, DropProperty, HashProperty, RenameEvent

FILE = """
storage = "memory://"
prefix = "/collect"
trusted_proxies = ["10.0.0.0/8"]
read_tokens = ["a-secret-of-16-characters"]

[limits]
max_batch_bytes = 512000

[[sources]]
write_key = "loose-key"

[[workspaces]]
id = "rosebud"
name = "Rosebud Motels"

[[workspaces.sources]]
id = "www"
write_key = "www-key"
allowed_origins = ["https://www.rosebudmotels.com"]
session_timeout = false
strict_event_names = true
rules = [
  { type = "rename_event", from = "signup", to = "Signed Up" },
  { type = "drop_property", name = "password" },
  { type = "hash_property", name = "email", salt = "pepper" },
  { type = "copy_context_field", path = "page.url", to = "url" },
]

[[workspaces.sources]]
id = "app"
write_key = "app-key"
partial_success_status = 200
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fp-collect.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_file_configures_workspaces_sources_and_rules(tmp_path: Path) -> None:
    config = CollectorConfig.from_file(write(tmp_path, FILE))
    assert (config.storage, config.prefix) == ("memory://", "/collect")
    assert config.read_tokens == ("a-secret-of-16-characters",)
    assert config.limits.max_batch_bytes == 512000
    loose, www, app = config.sources
    assert loose.workspace == "default"
    assert (www.workspace, app.workspace) == ("rosebud", "rosebud")
    assert www.session_timeout is None and app.session_timeout == 1800
    assert (www.partial_success_status, app.partial_success_status) == (207, 200)
    assert www.strict_event_names and www.allowed_origins == ("https://www.rosebudmotels.com",)
    assert www.rules.rules == (
        RenameEvent("signup", "Signed Up"),
        DropProperty("password"),
        HashProperty("email", "pepper"),
        CopyContextField("page.url", "url"),
    )
    assert config.workspaces[0].name == "Rosebud Motels"


def test_sources_of_one_workspace_share_profiles(tmp_path: Path) -> None:
    collector = Collector(CollectorConfig.from_file(write(tmp_path, FILE)))
    ids = []
    for key in ("www-key", "app-key", "loose-key"):
        body = json.dumps({"event": "Page Viewed", "write_key": key, "user_id": "u-1"}).encode()
        route = collector.route("/collect/events/track")
        assert route is not None
        answer = json.loads(collector.handle(route, Request("POST", "/collect/events/track",
                                                            body=body)).body)  # fmt: skip
        ids.append(answer["profile_id"])
    assert ids[0] == ids[1] != ids[2]  # rosebud shares; the default workspace is apart


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stroage = 'memory://'", "unknown key(s) stroage"),
        ("[[sources]]\nwrite_key = 'k'\ncolour = 'red'", "sources[0]: unknown key(s) colour"),
        ("[[sources]]\nwrite_key = 'k'\nrules = [{ type = 'shout' }]", "type must be one of"),
        (
            "[[sources]]\nwrite_key = 'k'\nrules = [{ type = 'drop_property' }]",
            "sources[0].rules[0]: a drop_property rule takes name",
        ),
        ("[[workspaces]]\nname = 'no id'", "Workspace.id"),
        ("storage = ", "not valid TOML"),
        ("read_tokens = 'short'", "must be an array"),
    ],
)
def test_mistakes_are_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        CollectorConfig.from_file(write(tmp_path, text))


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        CollectorConfig.from_file(tmp_path / "nope.toml")


def test_workspace_sets_its_sources_workspace() -> None:
    workspace = Workspace("shop", sources=(Source(write_key="k", id="s"),))
    config = CollectorConfig(workspaces=(workspace,), storage="memory://")
    assert [s.workspace for s in config.sources] == ["shop"]


def test_serve_with_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write(tmp_path, "stroage = 1")
    assert cli(["serve", "--config", str(bad)]) == 2
    assert "unknown key(s) stroage" in capsys.readouterr().err
    text = FILE.replace('storage = "memory://"', f'storage = "sqlite:///{tmp_path / "s.db"}"')
    path = write(tmp_path, text)
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    child = subprocess.Popen(
        [sys.executable, "-m", "fp_collect", "serve", "--config", str(path), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        body = json.dumps({"event": "Page Viewed", "write_key": "app-key"}).encode()
        deadline = time.monotonic() + 30
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/collect/events/track", data=body,
                    headers={"Content-Type": "application/json"})  # fmt: skip
                with urllib.request.urlopen(request, timeout=5) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                if child.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert answer["success"] is True
    finally:
        child.terminate()
        output, _ = child.communicate(timeout=15)
    assert "www-key" in output and "app-key" in output
