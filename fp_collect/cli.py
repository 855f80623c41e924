"""The ``fp-collect`` command: a development server and a look at what was collected.

::

    fp-collect serve                       # collector alone on http://127.0.0.1:8000
    fp-collect events --type track --since 2024-05-01T00:00:00+02:00 | jq .
    fp-collect rejections --reason invalid_write_key --limit 20

Every option can also be set with an ``FP_COLLECT_*`` environment variable (the
option wins). Problems the user can fix are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import secrets
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import IO, Any, NoReturn, TypeVar

from fp_collect import __version__
from fp_collect.config import CollectorConfig, Source
from fp_collect.errors import ConfigError, StoreUnavailable
from fp_collect.store import Query, Store, StoredEvent, StoredRejection, open_store, redact
from fp_collect.timestamps import format_iso, parse_iso

PROG = "fp-collect"
DEFAULT_STORAGE = "sqlite:///fp_collect.db"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000

EXIT_OK = 0
EXIT_USAGE = 2
# Conventional status for "stopped by Ctrl-C" (128 + SIGINT).
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A problem the user can fix: printed as one line on stderr, exit status 2."""


# -- options that can also come from the environment ------------------------------------


@dataclass(frozen=True)
class _EnvOption:
    """An option's environment variable; applied only where the flag was not given."""

    dest: str
    env: str
    convert: Callable[[str], Any]
    many: bool = False  # comma-separated in the environment, repeatable as a flag
    default: Any = None


def _add(
    parser: argparse.ArgumentParser,
    registry: list[_EnvOption],
    *flags: str,
    env: str,
    help: str,
    convert: Callable[[str], Any] = str,
    many: bool = False,
    default: Any = None,
    metavar: str | None = None,
    dest: str | None = None,
) -> None:
    shown = f" (default: {default})" if default not in (None, "") else ""
    action = parser.add_argument(
        *flags,
        dest=dest,
        type=convert,
        action="append" if many else "store",
        default=None,
        metavar=metavar,
        help=f"{help}{shown} [env: {env}]",
    )
    registry.append(_EnvOption(action.dest, env, convert, many, default))


def _add_switch(
    parser: argparse.ArgumentParser,
    registry: list[_EnvOption],
    flag: str,
    *,
    env: str,
    help: str,
) -> None:
    """A flag that takes no value (``--no-...`` turns it off, over its environment
    variable); the variable takes true or false."""
    action = parser.add_argument(
        flag, action=argparse.BooleanOptionalAction, default=None, help=f"{help} [env: {env}]"
    )
    registry.append(_EnvOption(action.dest, env, _switch, default=False))


def _apply_env(
    args: argparse.Namespace, options: Sequence[_EnvOption], environ: Mapping[str, str]
) -> None:
    for option in options:
        if getattr(args, option.dest) is not None:
            continue
        raw = environ.get(option.env, "").strip()
        value = option.default
        if raw:
            try:
                if option.many:
                    value = [
                        option.convert(part.strip()) for part in raw.split(",") if part.strip()
                    ]
                else:
                    value = option.convert(raw)
            except argparse.ArgumentTypeError as exc:
                raise CLIError(f"{option.env}={raw!r}: {exc}") from None
        setattr(args, option.dest, value)


# -- value checks (shared by flags and environment variables) ----------------------------


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return port


def _count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return count


def _instant(text: str) -> str:
    """Any ISO-8601 date or date-time, as the stored ``received_at`` form (UTC, ms)."""
    seconds = parse_iso(text.strip())
    if seconds is not None:
        try:
            return format_iso(seconds)
        except (OverflowError, ValueError):
            pass  # before year 1 or after 9999 once shifted to UTC
    raise argparse.ArgumentTypeError(
        f"{text!r} is not an ISO-8601 date or date-time "
        "(e.g. 2024-05-01, 2024-05-01T12:00:00Z or 2024-05-01T14:00:00+02:00)"
    )


def _switch(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError("must be true or false (1, yes, on / 0, no, off)")


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# -- the parser ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``fp-collect events: error: ... (try --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


_ENV_NOTE = "Every option can also be set with the environment variable shown; the option wins."

_SERVE_EPILOG = f"""\
Without a write key one is generated for this run and printed, with curl lines
to try. Routes are the Segment-spec HTTP Tracking API: PREFIX/v1/track, /v1/page,
/v1/identify, /v1/batch, ... For a real site, mount the collector inside your app
(fp_collect.adapters.wsgi.init_app, fp_collect.adapters.asgi.CollectorMiddleware).

{_ENV_NOTE}

examples:
  fp-collect serve
  fp-collect serve --port 9000 --write-key my-key --allowed-origin http://localhost:3000
  FP_COLLECT_STORAGE=sqlite:///events.db fp-collect serve
"""

_EVENTS_EPILOG = f"""\
Each line is the stored event exactly as kept, so the output feeds jq or any
JSON-lines tool. --since compares with the time the collector received the event.

{_ENV_NOTE}

examples:
  fp-collect events --storage sqlite:///events.db --type track --limit 10
  fp-collect events --since 2024-05-01T00:00:00+02:00 | jq -r .event
"""

_REJECTIONS_EPILOG = f"""\
Every refused request or event is kept with its reason and the raw payload.
Each line is one JSON object with the keys id, source_id, reason, message,
received_at, endpoint, index, message_id and payload (the raw text received).

{_ENV_NOTE}

examples:
  fp-collect rejections --reason invalid_write_key
  fp-collect rejections --since 2024-05-01 | jq -r .message
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``fp-collect`` argument parser (environment variables are applied by :func:`main`)."""
    parser = _Parser(
        prog=PROG,
        description="First-party analytics collection: a development server, and a look "
        "at the events and rejections a collector has stored.",
        epilog=f"Run '{PROG} COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    formatter = argparse.RawDescriptionHelpFormatter

    serve = commands.add_parser(
        "serve",
        help="run the collector alone, for development (needs uvicorn)",
        description="Run the collector on its own with uvicorn, for development and trials.",
        epilog=_SERVE_EPILOG,
        formatter_class=formatter,
    )
    serve_options: list[_EnvOption] = []
    _add_storage(serve, serve_options, "where events are written")
    _add(
        serve,
        serve_options,
        "--host",
        env="FP_COLLECT_HOST",
        convert=_nonempty,
        default=DEFAULT_HOST,
        help="interface to listen on",
    )
    _add(
        serve,
        serve_options,
        "--port",
        env="FP_COLLECT_PORT",
        convert=_port,
        default=DEFAULT_PORT,
        help="TCP port",
    )
    _add(
        serve,
        serve_options,
        "--prefix",
        env="FP_COLLECT_PREFIX",
        default="",
        metavar="PATH",
        help="path the routes live under, e.g. /collect gives /collect/v1/track",
    )
    _add(
        serve,
        serve_options,
        "--write-key",
        dest="write_keys",
        env="FP_COLLECT_WRITE_KEY",
        convert=_nonempty,
        many=True,
        metavar="KEY",
        help="write key to accept; repeat for several sources (comma separated in the "
        "environment). Default: a key generated for this run",
    )
    _add(
        serve,
        serve_options,
        "--allowed-origin",
        dest="allowed_origins",
        env="FP_COLLECT_ALLOWED_ORIGINS",
        convert=_nonempty,
        many=True,
        metavar="ORIGIN",
        help="browser origin allowed to send events, e.g. https://shop.example; repeat "
        "for several (comma separated in the environment). Default: any origin",
    )
    _add(
        serve,
        serve_options,
        "--config",
        env="FP_COLLECT_CONFIG",
        metavar="FILE",
        help="a TOML configuration file (workspaces, sources, rules, storage, prefix...); "
        "it then decides storage, prefix and sources, and --host/--port still apply",
    )
    serve.set_defaults(run=_serve, options=serve_options)

    events = commands.add_parser(
        "events",
        help="print stored events, one JSON object per line",
        description="Print stored events, oldest first, one JSON object per line.",
        epilog=_EVENTS_EPILOG,
        formatter_class=formatter,
    )
    event_options: list[_EnvOption] = []
    _add_storage(events, event_options, "the store to read (it must exist)")
    _add_filters(events, event_options)
    _add(
        events,
        event_options,
        "--type",
        env="FP_COLLECT_TYPE",
        metavar="TYPE",
        help="only this type: track, page, screen, identify, group or alias",
    )
    _add_window(events, event_options)
    _add_switch(
        events,
        event_options,
        "--flagged",
        env="FP_COLLECT_FLAGGED",
        help="only events stored with warnings (a failed rule, an event name that breaks "
        "the naming guidelines); each line then shows the warnings beside the event",
    )
    events.set_defaults(run=_events, options=event_options)

    rejections = commands.add_parser(
        "rejections",
        help="print what was refused and why, one JSON object per line",
        description="Print stored rejections (refused requests and events), oldest first,\n"
        "one JSON object per line.",
        epilog=_REJECTIONS_EPILOG,
        formatter_class=formatter,
    )
    rejection_options: list[_EnvOption] = []
    _add_storage(rejections, rejection_options, "the store to read (it must exist)")
    _add_filters(rejections, rejection_options)
    _add(
        rejections,
        rejection_options,
        "--reason",
        "--type",
        dest="reason",
        env="FP_COLLECT_REASON",
        metavar="REASON",
        help="only this reason, e.g. invalid_write_key, duplicate_message_id",
    )
    _add_window(rejections, rejection_options)
    rejections.set_defaults(run=_rejections, options=rejection_options)
    return parser


def _add_storage(parser: argparse.ArgumentParser, registry: list[_EnvOption], purpose: str) -> None:
    _add(
        parser,
        registry,
        "--storage",
        env="FP_COLLECT_STORAGE",
        default=DEFAULT_STORAGE,
        metavar="URL",
        help=f"storage URL, {purpose}: sqlite:///relative.db, sqlite:////absolute/path.db",
    )


def _add_filters(parser: argparse.ArgumentParser, registry: list[_EnvOption]) -> None:
    _add(
        parser,
        registry,
        "--source",
        env="FP_COLLECT_SOURCE",
        metavar="ID",
        help="only this source id",
    )


def _add_window(parser: argparse.ArgumentParser, registry: list[_EnvOption]) -> None:
    _add(
        parser,
        registry,
        "--since",
        env="FP_COLLECT_SINCE",
        convert=_instant,
        metavar="ISO",
        help="only those received at or after this ISO-8601 time (any offset; none means UTC)",
    )
    _add(
        parser,
        registry,
        "--limit",
        env="FP_COLLECT_LIMIT",
        convert=_count,
        metavar="N",
        help="print at most N",
    )


# -- entry point -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run ``fp-collect`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args.environ = os.environ if environ is None else environ
    try:
        _apply_env(args, args.options, args.environ)
        status: int = args.run(args)
    except (CLIError, ConfigError, StoreUnavailable) as exc:
        print(f"{PROG} {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return status


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- reading -----------------------------------------------------------------------------


_SILENT = logging.NullHandler()


# Rows are read this many at a time, so memory stays bounded however much is stored
# and `| head` stops the reading early.
PAGE_SIZE = 1000

_Row = TypeVar("_Row", StoredEvent, StoredRejection)


def _events(args: argparse.Namespace) -> int:
    query = Query(
        source_id=args.source,
        type=args.type,
        since=args.since,
        limit=args.limit,
        flagged=args.flagged,
    )
    line = _flagged_line if args.flagged else _payload_line
    with _open_for_reading(args.storage) as store:
        return _print_lines(line(event) for event in _paged(store.events, query))


def _payload_line(event: StoredEvent) -> str:
    return event.payload


def _flagged_line(event: StoredEvent) -> str:
    meta = json.dumps(
        {"id": event.id, "source_id": event.source_id, "message_id": event.message_id,
         "warnings": list(event.warnings)},
        ensure_ascii=False,
    )  # fmt: skip
    return meta[:-1] + ', "event": ' + event.payload + "}"


def _rejections(args: argparse.Namespace) -> int:
    query = Query(source_id=args.source, type=args.reason, since=args.since, limit=args.limit)
    with _open_for_reading(args.storage) as store:
        return _print_lines(_rejection_line(r) for r in _paged(store.rejections, query))


def _paged(read: Callable[[Query], Iterable[_Row]], query: Query) -> Iterator[_Row]:
    """Everything ``query`` matches, fetched a page at a time with the ``after_id`` cursor."""
    remaining = query.limit
    after_id = query.after_id
    while remaining is None or remaining > 0:
        size = PAGE_SIZE if remaining is None else min(PAGE_SIZE, remaining)
        rows = list(read(replace(query, after_id=after_id, limit=size)))
        yield from rows
        if len(rows) < size:
            return
        after_id = rows[-1].id
        if remaining is not None:
            remaining -= len(rows)


def _rejection_line(rejection: StoredRejection) -> str:
    return json.dumps(
        {
            "id": rejection.id,
            "source_id": rejection.source_id,
            "reason": rejection.reason,
            "message": rejection.message,
            "received_at": rejection.received_at,
            "endpoint": rejection.endpoint,
            "index": rejection.index,
            "message_id": rejection.message_id,
            "payload": rejection.payload,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


def _open_for_reading(url: str) -> Store:
    """Open an existing store; never create one just to find it empty."""
    # A failure is this command's one line on stderr: the drivers' own log lines (psycopg's
    # pool reporting each connection it discards or cannot make) would only repeat it.
    logging.getLogger("psycopg").addHandler(_SILENT)
    scheme, sep, rest = url.partition("://")
    if sep and scheme == "memory":
        raise CLIError(
            "memory:// keeps nothing between processes; point --storage at the store "
            f"the collector writes to, e.g. {DEFAULT_STORAGE}"
        )
    if sep and scheme == "sqlite":
        # The same path rule as open_store: three slashes relative, four absolute, and
        # the query (?synchronous=NORMAL) is an option, not part of the file name.
        rest = rest.partition("?")[0]
        shown = redact(url)
        path = rest[1:] if rest.startswith("/") else rest
        if path:
            where = os.path.abspath(path)
            if not os.path.exists(where):
                hint = ""
                if not os.path.isabs(path) and os.path.exists(os.sep + path):
                    hint = f"; for the absolute path use sqlite:////{path}"
                raise CLIError(
                    f"{where} does not exist (storage {shown}): nothing stored there yet{hint}"
                )
            if os.path.isdir(where):
                raise CLIError(f"{where} is a directory, not an SQLite file (storage {shown})")
    return open_store(url, create=False)


def _print_lines(lines: Iterable[str]) -> int:
    """Write ``lines`` to stdout as UTF-8, quietly stopping if the reader goes away."""
    sys.stdout.flush()
    binary: IO[bytes] | None = getattr(sys.stdout, "buffer", None)
    try:
        for line in lines:
            if binary is not None:
                # Bytes, so a payload prints the same whatever the locale's encoding is.
                binary.write(line.encode("utf-8", "backslashreplace") + b"\n")
            else:
                sys.stdout.write(line + "\n")
        (binary if binary is not None else sys.stdout).flush()
    except BrokenPipeError:
        # `fp-collect events | head -1`: the reader has what it wanted.
        _discard_stdout()
    return EXIT_OK


def _discard_stdout() -> None:
    # Python flushes stdout once more at exit; pointing it at devnull stops that flush
    # from failing again and printing "Exception ignored ... BrokenPipeError".
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


# -- the development server --------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise CLIError(
            "the dev server runs on uvicorn, which is not installed: "
            "install fp-collect[starlette] (pip install 'fp-collect[starlette]', or '.[starlette]'"
            " in a checkout)"
        ) from None
    # adapters/ becomes fp_collect.adapters only through setup.cfg's package_dir, which
    # mypy cannot follow from inside the package.
    from fp_collect.adapters.asgi import collector_app  # type: ignore[import-not-found]
    from fp_collect.collector import Collector

    keys: list[str] = args.write_keys or []
    generated = False
    if args.config:
        config = CollectorConfig.from_file(args.config)  # a ConfigError is one line, exit 2
        if not config.sources:
            raise CLIError(f"{args.config} configures no source: add [[workspaces.sources]]")
    else:
        generated = not keys
        if generated:
            keys = [secrets.token_urlsafe(24)]
        origins = tuple(args.allowed_origins or ("*",))
        config = CollectorConfig.from_env(
            args.environ,  # for what has no option here, such as FP_COLLECT_TRUSTED_PROXIES
            sources=tuple(Source(write_key=key, allowed_origins=origins) for key in keys),
            storage=args.storage,
            prefix=args.prefix,
        )
    collector = Collector(config)
    try:
        print(_banner(config, args.host, args.port, generated), flush=True)
        uvicorn.run(collector_app(collector=collector), host=args.host, port=args.port)
    except SystemExit as exc:  # uvicorn exits 1 when it cannot bind the port
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        collector.close()
    return EXIT_OK


def _banner(config: CollectorConfig, host: str, port: int, generated: bool) -> str:
    base = f"http://{_display_host(host)}:{port}{config.prefix}"
    # The banner ends up in terminals, logs and screenshots: never the storage password
    # (the "Try:" lines then need it put back, which beats leaking it).
    storage = redact(config.storage)
    first = config.sources[0]
    key = first.write_key
    lines = [
        f"{PROG} dev server (for development; mount the collector in your app for real use)",
        f"  storage:    {storage}",
        f"  endpoints:  {base}/v1/  (track, page, identify, group, alias, batch, ...)",
        f"  origins:    {', '.join(first.allowed_origins)}",
    ]
    for source in config.sources:
        lines.append(f"  write key:  {source.write_key}")
        lines.append(f"  source id:  {source.id}")
    if generated:
        lines.append(
            "  (the key was generated for this run; pass --write-key or set "
            "FP_COLLECT_WRITE_KEY to keep one)"
        )
    track = {"userId": "user-1", "event": "Signed Up", "properties": {"plan": "pro"}}
    page = {"writeKey": key, "anonymousId": "anon-1", "name": "Home"}
    lines += [
        "",
        "Try:",
        f"  curl -u {shlex.quote(key + ':')} -H 'Content-Type: application/json' "
        f"-d {shlex.quote(_compact(track))} {base}/v1/track",
        f"  curl -H 'Content-Type: text/plain' -d {shlex.quote(_compact(page))} {base}/v1/page",
        f"  {PROG} events --storage {shlex.quote(storage)}",
        f"  {PROG} rejections --storage {shlex.quote(storage)}",
        "",
    ]
    return "\n".join(lines)


def _display_host(host: str) -> str:
    # A wildcard address is where we listen, not where a client connects.
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))
