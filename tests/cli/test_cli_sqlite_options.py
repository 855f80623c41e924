"""The read commands take the SQLite URLs the README documents, options included."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

RunCLI = Callable[..., Any]


@pytest.mark.parametrize("command", ["events", "rejections"])
@pytest.mark.parametrize("option", ["?synchronous=NORMAL", "?synchronous=FULL"])
def test_a_store_url_with_its_synchronous_option_is_read(
    cli: RunCLI, store_url: str, command: str, option: str
) -> None:
    plain = cli([command, "--storage", store_url])
    with_option = cli([command, "--storage", store_url + option])
    assert with_option.status == 0, with_option.err
    assert with_option.out == plain.out and plain.lines


def test_a_missing_file_is_still_reported_with_an_option(cli: RunCLI, tmp_path: Path) -> None:
    path = tmp_path / "nothing-here.db"
    result = cli(["events", "--storage", f"sqlite:///{path}?synchronous=NORMAL"])
    assert result.status == 2
    assert f"{path} does not exist" in result.err
    assert list(tmp_path.iterdir()) == []
