"""``fp-collect serve --config FILE`` with a malformed file: one line on stderr naming
what is wrong, exit status 2, never a traceback (as the README promises)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fp_collect.cli import main as cli

SOURCE = "[[sources]]\nwrite_key = 'site-key'\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SOURCE + "session_timeout = '1800'", "sources[0]: Source.session_timeout must be"),
        (
            SOURCE + "restrictions = { email_open_window = '600' }",
            "sources[0].restrictions: Restrictions.email_open_window must be",
        ),
        (SOURCE + "[limits]\nmax_bytes = 5", "limits: unknown key(s) max_bytes"),
        (SOURCE + "[limits]\nmax_depth = '64'", "limits: Limits.max_depth must be"),
        (SOURCE + "rules = [{ type = ['x'] }]", "sources[0].rules[0]: type must be one of"),
        (SOURCE + "rules = [{ type = { a = 1 } }]", "sources[0].rules[0]: type must be one of"),
        (
            SOURCE + "rules = [{ type = 'drop_property', name = 5 }]",
            "sources[0].rules[0]: DropProperty.name must be",
        ),
        ("[[sources]]\nid = 'www'", "sources[0]: write_key is required"),
        (SOURCE + "id = 5", "sources[0]: Source.id must be a string, not int"),
        (SOURCE + "name = ['x']", "sources[0]: Source.name must be a string"),
        ("[[workspaces]]\nid = 'w'\nname = 5", "workspaces[0]: Workspace.name must be a string"),
        ("trusted_proxies = [10]", "trusted proxy 10 must be a string"),
        ("a = " + "[" * 5000 + "]" * 5000, "nests arrays or tables too deeply"),
        ("a = " + "{ b = " * 5000 + "1" + " }" * 5000, "nests arrays or tables too deeply"),
        ("prefix = '/my%20app'", "prefix '/my%20app' must be a plain path"),
        ("read_tokens = [' a-secret-of-16-characters']", "read_tokens[0] must be printable"),
        # Python will not convert an integer of more than 4,300 digits: tomllib fails.
        ("commit_timeout = 1" + "0" * 5000, "is not valid TOML"),
        ("commit_timeout = 1" + "0" * 400, "commit_timeout must be seconds"),
    ],
)
def test_a_malformed_file_is_one_line_and_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    message: str,
) -> None:
    # A file taken by mistake must fail the test, not serve until it times out.
    monkeypatch.setattr("uvicorn.run", _must_not_serve)
    path = tmp_path / "fp-collect.toml"
    path.write_text(text)
    assert cli(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fp-collect serve: error: ")
    assert message in err


def _must_not_serve(*args: object, **kwargs: object) -> None:
    pytest.fail("the dev server started with a malformed configuration")


def test_a_file_that_is_not_utf8_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "fp-collect.toml"
    path.write_bytes(b"storage = 'sqlite:///caf\xe9.db'\n")
    assert cli(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not valid TOML" in err
