"""The published distribution: fp_collect.adapters inside the package, never a
top-level ``adapters``, and the typing marker shipped."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build_wheel(tmp_path: Path) -> zipfile.ZipFile:
    # Build from a copy so the test never writes build/ or *.egg-info into the checkout.
    tree = tmp_path / "src"
    tree.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    for package in ("fp_collect", "adapters"):
        shutil.copytree(
            REPO / package, tree / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(out), str(tree)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = out.glob("*.whl")
    return zipfile.ZipFile(wheel)


def test_wheel_contents(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = set(wheel.namelist())
    modules = {n for n in names if not n.startswith("fp_collect-")}
    assert all(n.startswith("fp_collect/") for n in modules), sorted(modules)
    assert "fp_collect/py.typed" in names
    # Every module of the checkout, subpackages included (setup.cfg lists them by name).
    sources = {
        path.relative_to(REPO).as_posix() for path in (REPO / "fp_collect").rglob("*.py")
    } | {f"fp_collect/adapters/{path.name}" for path in (REPO / "adapters").glob("*.py")}
    assert "fp_collect/store/postgres/store.py" in sources
    assert sources - names == set()
    assert not any(n.startswith(("adapters/", "tests/", "examples/")) for n in names)
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert wheel.read(top_level).decode().split() == ["fp_collect"]
    assert "fp-collect = fp_collect.cli:main" in wheel.read(entry_points).decode()
