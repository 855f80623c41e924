"""benchmarks/store_writer.py runs (a short smoke; no speed is asserted, ever)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_store_writer_benchmark_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "store_writer.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("case "))
    rows = [line.rsplit(None, 2) for line in lines[start + 1 :] if line.strip()][:8]
    assert [row[0].strip() for row in rows] == [
        "track x1 new", "track x25 new", "track x100 new",
        "track x1 returning", "track x25 returning", "track x100 returning",
        "batch100 x1 new", "batch100 x1 returning",
    ]  # fmt: skip
    for _, best, median in rows:
        assert 0 < float(best) <= float(median)
