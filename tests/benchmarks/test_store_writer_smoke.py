"""benchmarks/store_writer.py runs (a short smoke; no speed is asserted, ever)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[2]


def table(*args: str) -> tuple[list[str], list[list[str]]]:
    """Run the benchmark; its output lines, and the table's rows (name, best CPU, median
    CPU, best wall) with every figure checked to be a positive number."""
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "store_writer.py"), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("case "))
    rows = [line.rsplit(None, 3) for line in lines[start + 1 :] if line.strip()]
    for _, best, median, wall in rows:
        assert 0 < float(best) <= float(median) and float(wall) > 0
    return lines, rows


def test_store_writer_benchmark_runs() -> None:
    _, rows = table()
    assert [row[0].strip() for row in rows][:8] == [
        "track x1 new", "track x25 new", "track x100 new",
        "track x1 returning", "track x25 returning", "track x100 returning",
        "batch100 x1 new", "batch100 x1 returning",
    ]  # fmt: skip


def test_store_writer_benchmark_runs_on_postgres_and_leaves_nothing(postgres_dsn: str) -> None:
    lines, rows = table("--store", "postgres", "--postgres-url", postgres_dsn, "--only", "x25")
    assert [row[0].strip() for row in rows][:4] == [
        "track x25 new", "track x25 new batch at a time",
        "track x25 returning", "track x25 returning batch at a time",
    ]  # fmt: skip
    schema = lines[0].split("schema ")[1].split(";")[0]
    with psycopg.connect(postgres_dsn) as conn:
        left = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        assert left.fetchone() is None
