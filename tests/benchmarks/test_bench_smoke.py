"""The benchmark scripts run (a short smoke; no speed is asserted, ever)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_core_pipeline_benchmark_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "core_pipeline.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == ["/v1/track", "/v1/batch"]
    for row in rows:
        floor, core, ratio = (float(cell.replace(",", "")) for cell in row[-3:])
        assert floor > 0 and core > 0 and ratio > 0
