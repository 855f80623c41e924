"""The README's Python examples are what users copy first: every complete one (with no
``...`` standing for the user's own code) must pass ``mypy --strict`` against the
library as it is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mypy import api as mypy_api

REPO = Path(__file__).resolve().parents[2]


def complete_examples() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return [block for block in blocks if "..." not in block]


def test_complete_readme_examples_pass_mypy_strict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    examples = complete_examples()
    assert len(examples) >= 4, "the README's examples were not found"
    files = []
    for number, code in enumerate(examples):
        path = tmp_path / f"readme_example_{number}.py"
        path.write_text(code)
        files.append(str(path))
    # setup.cfg's [mypy] settings, and fp_collect.adapters found as tests/run.sh finds it.
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("MYPYPATH", str(REPO / "tests" / "mypy_path"))
    report, errors, status = mypy_api.run(["--strict", "--config-file", "setup.cfg", *files])
    assert status == 0, report + errors
