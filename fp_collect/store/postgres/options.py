"""A ``postgresql://`` storage URL: this store's options, and the rest for libpq."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict, timeout_from_conninfo

from fp_collect.errors import ConfigError
from fp_collect.store import hide_secrets, redact

DEFAULT_SCHEMA = "fp_collect"
DEFAULT_POOL_SIZE = 4
DEFAULT_CONNECT_TIMEOUT = 5
DEFAULT_STATEMENT_TIMEOUT = 5.0
_OPTIONS = ("schema", "pool_size", "statement_timeout")


@dataclass(frozen=True, slots=True)
class PostgresOptions:
    """A storage URL split into what psycopg gets and what this store reads itself."""

    conninfo: str
    schema: str = DEFAULT_SCHEMA
    pool_size: int = DEFAULT_POOL_SIZE
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    # libpq parameters we default when neither the URL nor the environment sets them.
    defaults: tuple[tuple[str, str], ...] = ()

    def __repr__(self) -> str:
        # Options end up in logs and tracebacks; the conninfo may hold the password.
        return (
            f"PostgresOptions(conninfo={redact(self.conninfo)!r}, schema={self.schema!r}, "
            f"pool_size={self.pool_size!r}, statement_timeout={self.statement_timeout!r}, "
            f"connect_timeout={self.connect_timeout!r}, defaults={self.defaults!r})"
        )


def parse_url(url: str) -> PostgresOptions:
    """Read this store's options out of ``url``; the rest is left byte for byte."""
    base, sep, query = url.partition("?")
    kept: list[str] = []
    ours: dict[str, str] = {}
    for piece in query.split("&") if sep else ():
        key, _, value = piece.partition("=")
        if unquote(key) in _OPTIONS:
            ours[unquote(key)] = unquote(value)
        elif piece:
            kept.append(piece)
    conninfo = base + ("?" + "&".join(kept) if kept else "")
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        # libpq's message may quote the whole URL, or the part it cannot read, which
        # may be the password (a raw "%" or space in it, say).
        message = hide_secrets(str(exc), conninfo)
        raise ConfigError(f"invalid PostgreSQL URL: {message}") from None
    defaults: list[tuple[str, str]] = []
    for name, env, value in (
        ("connect_timeout", "PGCONNECT_TIMEOUT", str(DEFAULT_CONNECT_TIMEOUT)),
        ("application_name", "PGAPPNAME", "fp-collect"),
        # Text is exchanged as UTF-8 whatever the server's or the user's default.
        ("client_encoding", "PGCLIENTENCODING", "UTF8"),
    ):
        if name not in params and env not in os.environ:
            defaults.append((name, value))
    try:
        connect_timeout = timeout_from_conninfo({**params, **dict(defaults)})
    except psycopg.Error as exc:
        raise ConfigError(f"invalid PostgreSQL URL: {exc}") from None
    schema = ours.get("schema", DEFAULT_SCHEMA)
    if not schema or len(schema.encode()) > 63 or "\x00" in schema or schema.startswith("pg_"):
        # Longer names would be silently truncated by PostgreSQL; pg_ is reserved.
        raise ConfigError(f"schema={schema!r}: use 1 to 63 bytes, not starting with 'pg_'")
    pool_size = ours.get("pool_size", str(DEFAULT_POOL_SIZE))
    if not (pool_size.isascii() and pool_size.isdigit() and int(pool_size) > 0):
        raise ConfigError(f"pool_size={pool_size!r} must be a positive whole number")
    return PostgresOptions(
        conninfo=conninfo,
        schema=schema,
        pool_size=int(pool_size),
        statement_timeout=_seconds(ours, "statement_timeout", DEFAULT_STATEMENT_TIMEOUT),
        connect_timeout=connect_timeout,
        defaults=tuple(defaults),
    )


def _seconds(ours: dict[str, str], name: str, default: float) -> float:
    if name not in ours:
        return default
    try:
        value = float(ours[name])
    except ValueError:
        value = 0.0
    # PostgreSQL takes timeouts as 32-bit milliseconds; NaN and infinity fail this too.
    if not 0 < value < 10**6:
        raise ConfigError(f"{name}={ours[name]!r} must be a positive number of seconds")
    return value
