"""The benchmark scripts run (a short smoke; no speed is asserted, ever)."""

from __future__ import annotations

import http.client
import importlib.util
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest

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
        serialised, serialised_ratio = (float(cell.replace(",", "")) for cell in row[3:5])
        assert row[6] == "us"  # left at 0.40: any sign, a figure
        float(row[5])
        floor, core, ratio = (float(cell.replace(",", "")) for cell in row[-3:])
        assert floor > 0 and core > 0 and ratio > 0
        assert serialised > 0 and serialised_ratio > 0


def load_http_load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("http_load", REPO / "benchmarks" / "http_load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["http_load"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def check_table(output: str, names: tuple[str, ...]) -> None:
    """Every quick case has a row with sane, non-zero figures (never a speed bound)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("case "))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    header = lines[start]
    for label in ("p50 ms", "p99 ms", "x ceil", "x hand", "x grp", "RSS MiB"):
        header = header.replace(label, label.replace(" ", "_"))
    rows = {}
    for line in lines[start + 2 : end]:
        cells = dict(zip(header.split(), line.split(), strict=True))
        rows[cells["case"]] = {k: v.replace(",", "").rstrip("%") for k, v in cells.items()}
    assert tuple(rows) == names
    for name, row in rows.items():
        assert float(row["req/s"]) > 0 and float(row["p50_ms"]) > 0, row
        assert float(row["CPU%"]) > 0 and float(row["RSS_MiB"]) > 0, row
        assert row["non2xx"] == "0" and row["sockerr"] == "0", row
        if "-fp-collect-" in name:
            assert float(row["ev/s"]) > 0 and int(row["stored"]) > 0, row
            assert row["durable"] == "ok", row
        if name == "starlette-fp-collect-track":
            assert float(row["x_ceil"]) > 0, row  # its ratio to the bare app of the same run


@pytest.mark.timeout(300)
def test_http_benchmark_runs() -> None:
    """``http_load.py --quick`` with wrk (installed by the script when missing)."""
    http_load = load_http_load()
    try:
        http_load.ensure_wrk()
    except http_load.WrkUnavailable:
        # Only here, never in the benchmark itself: a stand-in load generator proves that
        # the servers, the durability check and the table work without wrk.
        return run_with_python_load(http_load)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "http_load.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(wrk -t1)" in result.stdout
    check_table(result.stdout, http_load.QUICK_CASES)
    assert time.monotonic() - started < 120


@pytest.mark.timeout(300)
@pytest.mark.parametrize("store", ["postgres", "redis"])
def test_http_benchmark_runs_on_the_server_stores(
    store: str, postgres_dsn: str, redis_url: str
) -> None:
    """``--store postgres|redis``: fp-collect on the shared servers, counted there, and
    the run's schema or key prefix removed afterwards."""
    http_load = load_http_load()

    def leftovers() -> set[str]:
        """Schemas or keys a benchmark run made on the shared server."""
        if store == "postgres":
            import psycopg

            with psycopg.connect(postgres_dsn, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'fp\\_bench\\_%'"
                ).fetchall()
                return {name for (name,) in rows}
        import redis

        with redis.Redis.from_url(redis_url) as client:
            return {key.decode() for key in client.scan_iter(match="fp-bench-*", count=1000)}

    before = leftovers()
    cases = ("starlette-bare-track", "starlette-fp-collect-track")
    try:
        http_load.ensure_wrk()
    except http_load.WrkUnavailable:
        server = postgres_dsn if store == "postgres" else redis_url
        run_with_python_load(http_load, cases, store=store, storage_server=server)
        assert leftovers() - before == set()
        return
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "http_load.py"), "--quick", "--store", store,
         "--postgres-url", postgres_dsn, "--redis-url", redis_url, "--only", ",".join(cases)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"fp-collect on {'PostgreSQL' if store == 'postgres' else 'Redis'} " in result.stdout
    check_table(result.stdout, cases)
    assert leftovers() - before == set()


def run_with_python_load(
    http_load: ModuleType, names: tuple[str, ...] | None = None, **options: str
) -> None:
    """FALLBACK, labelled as such in the table's heading: wrk could not be installed.
    Runs the quick cases (or ``names``), with ``options`` for ``run_case``."""

    def python_load(url: str, path: str, template: object, seconds: float) -> object:
        port = int(url.rsplit(":", 1)[1])
        statuses: dict[int, int] = {}
        latencies: list[float] = []
        lock = threading.Lock()
        deadline = time.monotonic() + seconds

        def client(number: int) -> None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            sent = 0
            while time.monotonic() < deadline:
                body = template.render(sent * 1000 + number, f"py{number}")  # type: ignore[attr-defined]
                began = time.monotonic()
                connection.request("POST", path, body, {"Authorization": http_load.AUTHORIZATION})
                response = connection.getresponse()
                response.read()
                with lock:
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                    latencies.append(time.monotonic() - began)
                sent += 1
            connection.close()

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        latencies.sort()
        return http_load.Load(
            requests=len(latencies),
            seconds=seconds,
            statuses=statuses,
            socket_errors=0,
            p50_ms=latencies[len(latencies) // 2] * 1e3,
            p99_ms=latencies[int(len(latencies) * 0.99)] * 1e3,
            generator="python",
        )

    names = names or http_load.QUICK_CASES
    cases = [c for c in http_load.all_cases() if c.name in names]
    results = [http_load.run_case(case, python_load, 1.0, **options) for case in cases]
    output = "FALLBACK: a Python load generator, wrk unavailable\n\n" + http_load.table([results])
    print(output)
    check_table(output, names)
