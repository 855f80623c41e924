"""HTTP benchmark: fp-collect mounted in Starlette and Flask, against the same apps bare.

For each framework it serves four tiny apps (``benchmarks/apps/``) one after the other:

* ``bare``: reads the body and answers 200 -- the ceiling;
* ``handwritten``: ``json.loads`` + SQLite INSERT + COMMIT per request;
* ``grouped``: the same INSERTs, committed by a writer thread a group of waiting requests
  at a time (group commit): what durability alone costs, done as well as by hand;
* ``fp-collect``: the collector mounted in the app, on its SQLite default, answering only
  after the commit (``synchronous=FULL``);

and drives each with ``wrk`` (``-t1 -c64``) on ``/collect/v1/track`` (one ~600-byte track
call per request) and ``/collect/v1/batch`` (100 such events per request). Every event
carries a unique ``messageId``, made in the Lua script, so nothing is deduplicated away.
The server is pinned to one core (``taskset -c 0``) and wrk to the other (``-c 1``).
Starlette runs under uvicorn (one process, no access log, uvloop + httptools when
installed), Flask under gunicorn (one sync worker); each framework's four apps get
exactly the same server settings.

After each run that stores events the server is stopped and the events in its (fresh)
SQLite file are counted: ``ev/s`` is events durably stored per second of the run, and
the run fails its check if fewer events were stored than were answered 2xx. Absolute
numbers drift on a shared machine; each ratio is between two runs of the same invocation.

    python benchmarks/http_load.py                       # 16 cases, 10 s each (~4 min)
    python benchmarks/http_load.py --duration 60 --only 'starlette-fp-collect-*'
    python benchmarks/http_load.py --quick               # the CI smoke: 3 cases, 1 s each
    python benchmarks/http_load.py --profile prof/       # also py-spy the fp-collect servers
    python benchmarks/http_load.py --store postgres      # fp-collect on the local PostgreSQL
    python benchmarks/http_load.py --store redis         # ... or Redis

Installs ``wrk`` with ``apt-get`` when it is missing (needs root); exits with status 3
if it cannot. Exits with status 1 if a run lost events (stored < answered 2xx).
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import http.client
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
APPS = HERE / "apps"
sys.path.insert(0, str(HERE))

from core_pipeline import track_message  # noqa: E402

from fp_collect.decoding import dumps  # noqa: E402

WRITE_KEY = "bench-key"
AUTHORIZATION = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
PREFIX = "/collect"
BATCH_SIZE = 100
USERS = 10_000  # distinct userIds cycled through, so profiles are both made and found
CONNECTIONS = 64
WRK_MISSING = 3  # exit status when wrk is missing and cannot be installed
NOISE = 0.10  # other processes' share of a benchmark core above which a row is flagged
FRAMEWORKS = ("starlette", "flask")
APP_KINDS = ("bare", "handwritten", "grouped", "fp-collect")
ENDPOINTS = ("track", "batch")
QUICK_CASES = ("starlette-bare-track", "starlette-fp-collect-track", "flask-fp-collect-batch")


# -- the request bodies ---------------------------------------------------------------


def track_item() -> dict[str, object]:
    """A track call as segment-analytics-python sends it (about 600 bytes), with the
    placeholders the Lua script replaces: ``@@MID@@`` (a unique messageId, see
    :func:`message_id`) and ``@@UID@@`` (the user's number)."""
    message = track_message(0)  # the core benchmark's, so both measure the same body
    message["userId"] = "user-@@UID@@"
    message["messageId"] = "@@MID@@"
    # Every event an order of its own: a repeated order id would be discarded (the
    # confirmation restriction) and never stored.
    message["properties"]["order_id"] = "order-@@MID@@"  # type: ignore[index]
    return message


def message_id(nonce: str, number: int) -> str:
    """The run's nonce and the event's number, its 12 digits reversed: unique, and as
    scattered over the key space as the random UUIDs real clients send (sequential ids
    would make the store's unique index look cheaper than it is)."""
    return f"{nonce}-{str(number).zfill(12)[::-1]}"


@dataclass(frozen=True)
class Template:
    """A body as literal text around per-event placeholders."""

    head: str
    item_parts: list[str]  # literal text between the placeholders of one event
    item_kinds: list[str]  # "m" (messageId) or "u" (userId number), one per gap
    tail: str
    events: int

    def render(self, first: int, nonce: str) -> bytes:
        """The body with events numbered from ``first`` (the Python load generator's
        and the readiness probe's version of what the Lua script does)."""
        items = []
        for number in range(first, first + self.events):
            out = [self.item_parts[0]]
            for kind, part in zip(self.item_kinds, self.item_parts[1:], strict=True):
                out.append(message_id(nonce, number) if kind == "m" else str(number % USERS))
                out.append(part)
            items.append("".join(out))
        return (self.head + ",".join(items) + self.tail).encode()


def make_template(endpoint: str) -> Template:
    item = dumps(track_item())
    pieces = re.split(r"@@(MID|UID)@@", item)
    parts, kinds = pieces[0::2], ["m" if k == "MID" else "u" for k in pieces[1::2]]
    if endpoint == "track":
        return Template("", parts, kinds, "", 1)
    envelope = dumps({"batch": ["@@ITEMS@@"], "sentAt": "2026-11-23T10:00:01.000Z"})
    head, tail = envelope.split('"@@ITEMS@@"')
    return Template(head, parts, kinds, tail, BATCH_SIZE)


def lua_script(template: Template, path: str, nonce: str) -> str:
    """A wrk script posting ``template`` with fresh ids on every request, counting
    answers per status and printing one ``FPBENCH {json}`` line when done."""

    def literal(text: str) -> str:
        assert "]==]" not in text
        return f"[==[{text}]==]"

    return f"""-- generated by benchmarks/http_load.py
local head, tail = {literal(template.head)}, {literal(template.tail)}
local parts = {{{", ".join(literal(p) for p in template.item_parts)}}}
local kinds = {{{", ".join(f'"{k}"' for k in template.item_kinds)}}}
local events, users, nonce = {template.events}, {USERS}, "{nonce}-"
local counter = 0
statuses = {{}}  -- global: done() reads it from each thread

wrk.method = "POST"
wrk.path = "{path}"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "{AUTHORIZATION}"
wrk.headers["User-Agent"] = "analytics-python/2.4.0"

function request()
  local out = {{head}}
  for e = 1, events do
    counter = counter + 1
    if e > 1 then out[#out + 1] = "," end
    out[#out + 1] = parts[1]
    for i = 1, #kinds do
      if kinds[i] == "m" then
        out[#out + 1] = nonce .. string.reverse(string.format("%012d", counter))
      else
        out[#out + 1] = tostring(counter % users)
      end
      out[#out + 1] = parts[i + 1]
    end
  end
  out[#out + 1] = tail
  return wrk.format(nil, nil, nil, table.concat(out))
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

local threads = {{}}
function setup(thread)
  threads[#threads + 1] = thread
end

function done(summary, latency, requests)
  local codes = {{}}
  for _, thread in ipairs(threads) do
    for code, n in pairs(thread:get("statuses")) do
      codes[code] = (codes[code] or 0) + n
    end
  end
  local listed = {{}}
  for code, n in pairs(codes) do
    listed[#listed + 1] = string.format('"%d":%d', code, n)
  end
  local e = summary.errors
  io.write(string.format(
    'FPBENCH {{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},' ..
    '"latency_us":{{"p50":%d,"p90":%d,"p99":%d,"max":%d}},"statuses":{{%s}}}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    table.concat(listed, ",")))
end
"""


# -- the load generators -------------------------------------------------------------


@dataclass
class Load:
    """What a load generator measured."""

    requests: int
    seconds: float
    statuses: dict[int, int]
    socket_errors: int
    p50_ms: float
    p99_ms: float
    generator: str = "wrk"

    @property
    def ok(self) -> int:
        return sum(n for code, n in self.statuses.items() if 200 <= code < 300)

    @property
    def not_ok(self) -> int:
        return self.requests - self.ok


LoadGenerator = Callable[[str, str, Template, float], Load]


def ensure_wrk() -> str:
    """The path of ``wrk``, installed from Debian's packages when missing."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise WrkUnavailable("wrk is not installed; install it with: apt-get install -y wrk")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print("wrk is missing: apt-get install -y wrk ...", file=sys.stderr, flush=True)
    install = [apt, "install", "-y", "-q", "wrk"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # no package lists yet on a fresh machine
        subprocess.run([apt, "update", "-q"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    found = shutil.which("wrk")
    if found is None:
        raise WrkUnavailable(f"could not install wrk with apt-get:\n{done.stderr[-2000:]}")
    return found


class WrkUnavailable(RuntimeError):
    pass


def wrk_load(cpu: int) -> LoadGenerator:
    wrk = ensure_wrk()

    def run(url: str, path: str, template: Template, seconds: float) -> Load:
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write(lua_script(template, path, uuid.uuid4().hex[:12]))
        try:
            command = ["taskset", "-c", str(cpu), wrk, "-t1", f"-c{CONNECTIONS}"]
            command += [f"-d{seconds:g}s", "--timeout", "5s", "-s", script.name, url]
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=seconds + 60, check=False
            )
        finally:
            os.unlink(script.name)
        line = next((x for x in done.stdout.splitlines() if x.startswith("FPBENCH ")), None)
        if done.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        report = json.loads(line[len("FPBENCH ") :])
        errors = report["errors"]
        return Load(
            requests=report["requests"],
            seconds=report["duration_us"] / 1e6,
            statuses={int(code): n for code, n in report["statuses"].items()},
            # "status" (answers >= 400) is already in statuses; the rest never got one.
            socket_errors=errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
            p50_ms=report["latency_us"]["p50"] / 1e3,
            p99_ms=report["latency_us"]["p99"] / 1e3,
        )

    return run


# -- the servers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    framework: str
    app: str
    endpoint: str

    @property
    def name(self) -> str:
        return f"{self.framework}-{self.app}-{self.endpoint}"

    @property
    def stores(self) -> bool:
        return self.app != "bare"


def all_cases() -> list[Case]:
    return [
        Case(framework, app, endpoint)
        for framework in FRAMEWORKS
        for endpoint in ENDPOINTS
        for app in APP_KINDS
    ]


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def uvicorn_options(fast: bool = True) -> list[str]:
    """The same for every Starlette app: the fastest loop and parser installed, or with
    ``fast=False`` uvicorn's defaults without them (asyncio and h11)."""
    options = ["--no-access-log", "--log-level", "warning"]
    if fast and has_module("uvloop"):
        options += ["--loop", "uvloop"]
    if fast and has_module("httptools"):
        options += ["--http", "httptools"]
    if not fast:
        options += ["--loop", "asyncio", "--http", "h11"]
    return options


def gunicorn_options(threads: int = 0) -> list[str]:
    """One worker: ``sync`` (one request at a time), or with ``threads`` the ``gthread``
    worker, whose threads serve concurrent requests in the one process."""
    if threads:
        worker = ["--worker-class", "gthread", "--threads", str(threads)]
    else:
        worker = ["--worker-class", "sync"]
    return ["--workers", "1", *worker, "--log-level", "warning"]


def server_command(
    case: Case, port: int, fast_uvicorn: bool = True, flask_threads: int = 0
) -> list[str]:
    factory = case.app.replace("-", "_")
    if case.framework == "starlette":
        return [
            sys.executable, "-m", "uvicorn", "--factory", f"starlette_apps:{factory}",
            "--app-dir", str(APPS), "--host", "127.0.0.1", "--port", str(port),
            *uvicorn_options(fast_uvicorn),
        ]  # fmt: skip
    return [
        sys.executable, "-m", "gunicorn", "--chdir", str(APPS),
        "--bind", f"127.0.0.1:{port}", *gunicorn_options(flask_threads),
        f"flask_apps:{factory}()",
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    db: Path
    log: Path
    rss_kib: list[int] = field(default_factory=list)
    cpu_share: dict[int, float] = field(default_factory=dict)  # thread id: share of a core
    core_busy: float = 0.0  # how busy the server's core was, whoever used it
    client_others: float = 0.0  # CPU others took on the load generator's core

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serving_pid(self) -> int:
        """The process that answers requests: uvicorn's only one, gunicorn's worker."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            kids = [int(pid) for pid in children.read_text().split()]
        except OSError:
            kids = []
        return kids[0] if kids else self.process.pid

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@contextmanager
def serve(
    case: Case,
    cpu: int,
    workdir: Path,
    synchronous: str,
    storage: Storage,
    fast_uvicorn: bool = True,
    flask_threads: int = 0,
) -> Iterator[Server]:
    port = free_port()
    db, log = storage.db, workdir / f"{case.name}.log"
    env = {**os.environ, "FP_BENCH_DB": str(db), "FP_BENCH_SYNCHRONOUS": synchronous}
    env["FP_BENCH_STORE"] = storage.kind
    if storage.url is not None:
        env["FP_BENCH_STORAGE_URL"] = storage.url
    env.pop("PYTHONPATH", None)
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["taskset", "-c", str(cpu), *server_command(case, port, fast_uvicorn, flask_threads)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    server = Server(process, port, db, log)
    try:
        wait_ready(server, case)
        yield server
    finally:
        stop(server)


def wait_ready(server: Server, case: Case, timeout: float = 60.0) -> None:
    """Until one real request is answered 200 (gunicorn listens before its worker is up)."""
    body = make_template(case.endpoint).render(0, f"ready-{uuid.uuid4().hex[:8]}")
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{case.name}: the server exited:\n{server.log_tail()}")
        try:
            status = post(server.port, f"{PREFIX}/v1/{case.endpoint}", body)
            if status == 200:
                return
            last = status
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{case.name}: not ready after {timeout} s ({last}):\n{server.log_tail()}")


def post(port: int, path: str, body: bytes) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Content-Type": "application/json", "Authorization": AUTHORIZATION}
        connection.request("POST", path, body, headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def stop(server: Server) -> None:
    """SIGTERM and wait: both servers shut down gracefully, flushing the store."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def stored_events(db: Path) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        (count,) = conn.execute("SELECT count(*) FROM events").fetchone()
        return int(count)
    finally:
        conn.close()


@dataclass(frozen=True)
class Storage:
    """Where one run's fp-collect keeps its events: the run's fresh SQLite file (also the
    hand-written handler's), or a PostgreSQL schema or Redis key prefix of the run's own on
    the local server, removed after the run."""

    kind: str  # sqlite, memory, postgres or redis
    db: Path
    server: str = ""  # the PostgreSQL or Redis server's URL
    name: str = ""  # the schema or key prefix

    @classmethod
    def fresh(cls, kind: str, db: Path, server: str) -> Storage:
        tag = uuid.uuid4().hex[:12]
        name = {"postgres": f"fp_bench_{tag}", "redis": f"fp-bench-{tag}:"}.get(kind, "")
        return cls(kind, db, server, name)

    @property
    def url(self) -> str | None:
        """fp-collect's storage URL, when it is not the SQLite file."""
        if self.kind == "postgres":
            return with_option(self.server, "schema", self.name)
        if self.kind == "redis":
            return with_option(self.server, "prefix", self.name)
        return None

    def count(self, case: Case) -> int:
        """Events stored by the run so far (read after the server has stopped)."""
        if case.app != "fp-collect" or self.url is None:
            return stored_events(self.db)
        if self.kind == "postgres":
            import psycopg

            with psycopg.connect(self.server, autocommit=True) as conn:
                found = conn.execute("SELECT to_regclass(%s)", (f"{self.name}.events",))
                if found.fetchone() == (None,):
                    return 0
                row = conn.execute(f'SELECT count(*) FROM "{self.name}".events').fetchone()
                return int(row[0]) if row else 0
        import redis

        with redis.Redis.from_url(self.server) as client:
            return int(client.xlen(f"{self.name}events:bench"))

    def remove(self) -> None:
        if self.kind == "postgres":
            import psycopg

            with psycopg.connect(self.server, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
        elif self.kind == "redis":
            import redis

            with redis.Redis.from_url(self.server) as client:
                keys = list(client.scan_iter(match=f"{self.name}*", count=1000))
                for start in range(0, len(keys), 1000):
                    client.delete(*keys[start : start + 1000])


def with_option(url: str, name: str, value: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{name}={value}"


def storage_server(kind: str, postgres_url: str, redis_url: str) -> str:
    return {"postgres": postgres_url, "redis": redis_url}.get(kind, "")


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU time (user + system) of each thread of ``pid`` so far, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    times = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        times[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return times


def core_busy_seconds(cpu: int) -> float:
    """Seconds CPU ``cpu`` has spent busy (not idle, not waiting for I/O) since boot."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line.split()[1:9])
            return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return 0.0


def own_cpu_seconds() -> float:
    """CPU time of this process and of its children waited for so far (wrk, py-spy)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextmanager
def sampling(server: Server, cpu: int, client_cpu: int, every: float = 0.25) -> Iterator[None]:
    """While the block runs: sample the serving process's resident set size (VmRSS),
    measure the CPU time each of its threads used, and how much of each core other
    processes took (this machine may be shared: their load skews the figures)."""
    stop_event = threading.Event()
    pid = server.serving_pid()

    def sample() -> None:
        while True:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                server.rss_kib.append(int(re.search(r"VmRSS:\s+(\d+)", status)[1]))  # type: ignore[index]
            except (OSError, TypeError):
                pass
            if stop_event.wait(every):
                return

    thread = threading.Thread(target=sample, daemon=True)
    before, began = thread_cpu_seconds(pid), time.monotonic()
    busy, client_busy, ours = (
        core_busy_seconds(cpu),
        core_busy_seconds(client_cpu),
        own_cpu_seconds(),
    )
    thread.start()
    try:
        yield
    finally:
        after, wall = thread_cpu_seconds(pid), time.monotonic() - began
        server.core_busy = (core_busy_seconds(cpu) - busy) / wall
        # On the load generator's core: everything but wrk and this script.
        server.client_others = (
            core_busy_seconds(client_cpu) - client_busy - (own_cpu_seconds() - ours)
        ) / wall
        stop_event.set()
        thread.join()
        # The main thread (its id is the pid) first, then the others, e.g. the SQLite writer.
        server.cpu_share = {
            tid: (after[tid] - before.get(tid, 0.0)) / wall
            for tid in sorted(after, key=lambda tid: (tid != pid, tid))
        }


@contextmanager
def profiling(server: Server, case: Case, directory: Path | None, seconds: float, cpu: int):  # type: ignore[no-untyped-def]
    """py-spy record of the serving process for the run, as collapsed stacks and SVG."""
    if directory is None or case.app != "fp-collect":
        yield
        return
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    directory.mkdir(parents=True, exist_ok=True)
    pid = str(server.serving_pid())
    common = ["taskset", "-c", str(cpu), py_spy, "record", "--pid", pid, "--nonblocking"]
    common += ["--rate", "200", "--threads", "--duration", str(max(1, int(seconds)))]
    out = directory / f"{case.name}.txt"
    recorder = subprocess.Popen(
        [*common, "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        recorder.wait(timeout=seconds + 60)


# -- one case, and the table -------------------------------------------------------------


@dataclass
class Result:
    case: Case
    load: Load
    events_per_request: int
    stored: int | None  # events stored during the run, None for the bare apps
    rss_kib: list[int]
    cpu_share: dict[int, float] = field(default_factory=dict)
    # CPU that other processes took on the server's core, and on the load generator's,
    # during the run (a shared machine): more than a few percent, and the row is skewed.
    others: float = 0.0
    client_others: float = 0.0

    @property
    def cpu(self) -> float:
        """The server's CPU use during the run, as a share of one core."""
        return sum(self.cpu_share.values())

    @property
    def req_per_s(self) -> float:
        return self.load.ok / self.load.seconds

    @property
    def events_per_s(self) -> float | None:
        return None if self.stored is None else self.stored / self.load.seconds

    @property
    def lost(self) -> int:
        """Events answered 2xx that are not in the store (must be 0)."""
        if self.stored is None:
            return 0
        return max(0, self.load.ok * self.events_per_request - self.stored)


def run_case(
    case: Case,
    load: LoadGenerator,
    seconds: float,
    *,
    server_cpu: int = 0,
    client_cpu: int = 1,
    warmup: float = 0.0,
    synchronous: str = "FULL",
    store: str = "sqlite",
    fast_uvicorn: bool = True,
    flask_threads: int = 0,
    profile: Path | None = None,
    storage_server: str = "",
) -> Result:
    template = make_template(case.endpoint)
    path = f"{PREFIX}/v1/{case.endpoint}"
    with tempfile.TemporaryDirectory(prefix="fp-bench-") as tmp:
        workdir = Path(tmp)
        storage = Storage.fresh(store, workdir / f"{case.name}.db", storage_server)
        # fp-collect on memory:// (a diagnosis) keeps nothing that could be counted.
        stores = case.stores and not (store == "memory" and case.app == "fp-collect")
        try:
            with serve(
                case, server_cpu, workdir, synchronous, storage, fast_uvicorn, flask_threads
            ) as server:
                if warmup:
                    load(server.url, path, template, warmup)
                    time.sleep(0.5)  # let the warm-up's last commits land before counting
                before = storage.count(case) if stores else 0
                with (
                    sampling(server, server_cpu, client_cpu),
                    profiling(server, case, profile, seconds, client_cpu),
                ):
                    measured = load(server.url, path, template, seconds)
            # The server has stopped: everything it committed is in the store.
            stored = storage.count(case) - before if stores else None
        finally:
            storage.remove()
        return Result(
            case,
            measured,
            template.events,
            stored,
            server.rss_kib,
            server.cpu_share,
            others=max(0.0, server.core_busy - sum(server.cpu_share.values())),
            client_others=max(0.0, server.client_others),
        )


def table(rounds: list[list[Result]]) -> str:
    """One row per case. With several rounds (``--repeat``), a row shows the round with
    the median req/s, ``spread`` how far the rounds' req/s lay apart (half the range,
    relative to that median), and each ratio is the median of the ratios measured within
    one round, so that both sides of a ratio ran minutes apart at most."""
    names = [r.case.name for r in rounds[0]]
    by_round = [{r.case.name: r for r in results} for results in rounds]

    def median_ratio(case: Case, app: str) -> float | None:
        base_name = f"{case.framework}-{app}-{case.endpoint}"
        ratios = [
            found[case.name].req_per_s / found[base_name].req_per_s
            for found in by_round
            if base_name in found and found[base_name].req_per_s
        ]
        return statistics.median(ratios) if ratios else None

    header = (
        f"{'case':<28}{'req/s':>9}{'spread':>8}{'ev/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'non2xx':>8}{'sockerr':>8}{'stored':>10}{'durable':>9}{'x ceil':>8}{'x hand':>8}"
        f"{'x grp':>7}"
        f"{'CPU%':>6}{'others%':>9}{'RSS MiB':>9}{'dRSS':>7}"
    )
    lines = [header, "-" * len(header)]
    for name in names:
        runs = sorted((found[name] for found in by_round), key=lambda r: r.req_per_s)
        r, c = representative(runs), runs[0].case
        spread = (runs[-1].req_per_s - runs[0].req_per_s) / 2 / r.req_per_s if r.req_per_s else 0
        ceiling = median_ratio(c, "bare") if c.app != "bare" else None
        hand = median_ratio(c, "handwritten") if c.app == "fp-collect" else None
        grouped = median_ratio(c, "grouped") if c.app == "fp-collect" else None
        eps = r.events_per_s
        rss = r.rss_kib
        lost = sum(run.lost for run in runs)
        lines.append(
            f"{c.name:<28}{r.req_per_s:>9,.0f}{f'±{spread:.0%}' if len(runs) > 1 else '-':>8}"
            f"{'-' if eps is None else f'{eps:,.0f}':>10}"
            f"{r.load.p50_ms:>9.1f}{r.load.p99_ms:>9.1f}{r.load.not_ok:>8,}"
            f"{r.load.socket_errors:>8,}{'-' if r.stored is None else f'{r.stored:,}':>10}"
            f"{'-' if r.stored is None else ('ok' if not lost else f'LOST {lost}'):>9}"
            f"{'-' if ceiling is None else f'{ceiling:.2f}':>8}"
            f"{'-' if hand is None else f'{hand:.2f}':>8}"
            f"{'-' if grouped is None else f'{grouped:.2f}':>7}"
            f"{r.cpu:>6.0%}{f'{r.others:.0%}/{r.client_others:.0%}':>9}"
            f"{(max(rss) / 1024 if rss else 0):>9.1f}"
            f"{((rss[-1] - rss[0]) / 1024 if rss else 0):>+7.1f}"
        )
    return "\n".join(lines)


def representative(runs: list[Result]) -> Result:
    """The run with the median req/s (the lower middle one of an even number)."""
    ordered = sorted(runs, key=lambda r: r.req_per_s)
    return ordered[(len(ordered) - 1) // 2]


def describe(
    seconds: float,
    synchronous: str,
    store: str,
    generator: str,
    fast_uvicorn: bool = True,
    flask_threads: int = 0,
) -> str:
    track, batch = make_template("track"), make_template("batch")
    size = len(track.render(1, "0123456789ab"))
    batch_size = len(batch.render(1, "0123456789ab"))
    versions = []
    for package in ("uvicorn", "gunicorn", "starlette", "flask"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} (missing)")
    return (
        f"{seconds:g} s per case, {CONNECTIONS} connections ({generator}); server on one core,"
        f" load generator on the other\n"
        f"track body {size} B; batch {BATCH_SIZE} events, {batch_size:,} B;"
        f" SQLite {sqlite3.sqlite_version} WAL synchronous={synchronous}\n"
        f"{', '.join(versions)}, Python {platform.python_version()}\n"
        + (
            "fp-collect on memory:// -- NOT durable, a diagnosis of what SQLite costs\n"
            if store == "memory"
            else ""
        )
        + f"uvicorn {' '.join(uvicorn_options(fast_uvicorn))}"
        + f" | gunicorn {' '.join(gunicorn_options(flask_threads))}"
    )


def server_line(store: str, server: str) -> str:
    """The database server fp-collect stores on, when it is not SQLite in the process."""
    if store == "postgres":
        import psycopg

        with psycopg.connect(server, autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        version = f"PostgreSQL {row[0] if row else '?'}"
    elif store == "redis":
        import redis

        with redis.Redis.from_url(server) as client:
            version = f"Redis {client.info('server')['redis_version']}"
    else:
        return ""
    return (
        f"\nfp-collect on {version} ({server}): its server runs unpinned, sharing both"
        " cores with the app and wrk; the hand-written handler stays on SQLite"
    )


def select(only: str | None, quick: bool) -> list[Case]:
    cases = all_cases()
    if only is None:
        if quick:
            return [c for c in cases if c.name in QUICK_CASES]
        return cases
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    chosen = [c for c in cases if any(fnmatch.fnmatch(c.name, p) or p in c.name for p in patterns)]
    if not chosen:
        names = ", ".join(c.name for c in cases)
        raise SystemExit(f"--only {only!r} matches no case; the cases are: {names}")
    return chosen


def main(argv: list[str] | None = None, load: LoadGenerator | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, help="seconds per case (default 10; 1 quick)")
    parser.add_argument("--quick", action="store_true", help="the CI smoke: 3 cases, 1 s each")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds over all cases; medians are shown (3 on a shared machine)",
    )
    parser.add_argument("--only", help="comma-separated case names or globs, e.g. 'flask-*'")
    parser.add_argument(
        "--synchronous", choices=("FULL", "NORMAL"), default="FULL", help="SQLite synchronous"
    )
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgres", "redis", "memory"),
        default="sqlite",
        help="fp-collect's store (the hand-written handler stays on SQLite); postgres and"
        " redis use a schema or key prefix of each run's own on the servers below, removed"
        " afterwards; memory:// is not durable (diagnosis only)",
    )
    parser.add_argument("--postgres-url", default="postgresql://127.0.0.1:5432/test")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--plain-uvicorn",
        action="store_true",
        help="uvicorn's defaults (asyncio, h11) instead of uvloop and httptools",
    )
    parser.add_argument(
        "--flask-threads",
        type=int,
        default=0,
        help="serve every Flask app with gunicorn's gthread worker and N threads (default:"
        " one sync worker)",
    )
    parser.add_argument("--profile", type=Path, help="py-spy the fp-collect servers into DIR")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    args = parser.parse_args(argv)
    seconds = args.duration if args.duration is not None else (1.0 if args.quick else 10.0)
    cases = select(args.only, args.quick)
    missing = {args.server_cpu, args.client_cpu} - os.sched_getaffinity(0)
    if missing or args.server_cpu == args.client_cpu:
        raise SystemExit(
            f"needs two distinct usable CPUs for the server and wrk (got --server-cpu"
            f" {args.server_cpu}, --client-cpu {args.client_cpu}; usable:"
            f" {sorted(os.sched_getaffinity(0))})"
        )
    generator = "wrk -t1"
    if load is None:
        try:
            load = wrk_load(args.client_cpu)
        except WrkUnavailable as exc:
            print(exc, file=sys.stderr)
            return WRK_MISSING
    else:
        generator = "a Python load generator, NOT wrk"
    # The harness itself (RSS sampling, readiness probes) stays off the server's core.
    os.sched_setaffinity(0, {args.client_cpu})
    fast = not args.plain_uvicorn
    print(
        describe(seconds, args.synchronous, args.store, generator, fast, args.flask_threads)
        + server_line(args.store, storage_server(args.store, args.postgres_url, args.redis_url)),
        flush=True,
    )
    rounds: list[list[Result]] = []
    for round_number in range(args.repeat):
        results = []
        for case in cases:
            where = f" (round {round_number + 1} of {args.repeat})" if args.repeat > 1 else ""
            print(f"  {case.name}{where} ...", file=sys.stderr, flush=True)
            results.append(
                run_case(
                    case,
                    load,
                    seconds,
                    server_cpu=args.server_cpu,
                    client_cpu=args.client_cpu,
                    warmup=0.0 if args.quick else 1.0,
                    synchronous=args.synchronous,
                    store=args.store,
                    fast_uvicorn=fast,
                    flask_threads=args.flask_threads,
                    profile=args.profile,
                    storage_server=storage_server(args.store, args.postgres_url, args.redis_url),
                )
            )
        rounds.append(results)
    print()
    print(table(rounds))
    print("\nServer CPU per request by thread (main thread first; then e.g. the SQLite writer):")
    for runs in zip(*rounds, strict=True):
        r = representative(list(runs))
        per_request = [
            f"{share / r.req_per_s * 1e6:,.0f} us ({share:.0%})"
            for share in r.cpu_share.values()
            if share >= 0.005 and r.req_per_s
        ]
        print(f"  {r.case.name:<28}{', '.join(per_request)}")
    everything = [r for results in rounds for r in results]
    skewed = sorted({r.case.name for r in everything if max(r.others, r.client_others) > NOISE})
    if skewed:
        print(
            f"\nWARNING: other processes took more than {NOISE:.0%} of the server's or the"
            f" load generator's core during {', '.join(skewed)} (the others% column):"
            " those figures are too low, and ratios against them unreliable. Rerun on a"
            " quiet machine."
        )
    failed = sorted({r.case.name for r in everything if r.load.not_ok or r.load.socket_errors})
    if failed:
        print(
            f"\nERRORS: some requests of {', '.join(failed)} were answered outside 2xx or not"
            " at all (the non2xx and sockerr columns, for the median round): their req/s"
            " count only the 2xx answers."
        )
    lost = sorted({r.case.name for r in everything if r.lost})
    if lost:
        print(f"\nLOST EVENTS (answered 2xx, not stored): {', '.join(lost)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
