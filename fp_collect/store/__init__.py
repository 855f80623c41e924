"""Storage backends, selected by URL."""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import parse_qsl, unquote

from fp_collect.errors import ConfigError
from fp_collect.store.base import (
    DUPLICATE,
    STORED,
    Batch,
    Claim,
    EventRecord,
    Outcome,
    Query,
    RejectionRecord,
    Store,
    StoredEvent,
    StoredRejection,
)

__all__ = [
    "DUPLICATE",
    "STORED",
    "Batch",
    "Claim",
    "EventRecord",
    "Outcome",
    "Query",
    "RejectionRecord",
    "Store",
    "StoredEvent",
    "StoredRejection",
    "open_store",
    "redact",
]


def open_store(url: str, *, create: bool = True) -> Store:
    """Open the backend a storage URL names.

    ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` (the default, one machine),
    ``memory://`` (tests), ``postgresql://...`` (needs ``fp-collect[postgres]``) and
    ``redis://...`` (needs ``fp-collect[redis]``).

    A SQLite URL may end in ``?synchronous=NORMAL`` (or ``FULL``, the default). With
    ``FULL`` every commit is fsynced before the request is answered: an event answered
    2xx survives a crash of the process, of the operating system and a power cut (as far
    as the disk honours flushes). With ``NORMAL`` commits are written to the WAL but
    fsynced only at checkpoints: an answered event survives a crash of the process, but
    the last commits before an OS crash or a power cut may be lost (the file itself is
    never corrupted). It saves the fsync wait and some CPU per commit, which matters
    most where each request is a transaction of its own (Flask under sync workers).

    ``create=False`` is for readers: a SQLite file or a PostgreSQL schema that does not
    hold fp-collect's tables is refused (:class:`ConfigError`) instead of created. (Redis
    creates nothing on open.)
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        # Not shown: without "://" it cannot be told where a password would be.
        raise ConfigError("the storage URL has no scheme:// (try 'sqlite:///events.db')")
    if scheme == "memory":
        from fp_collect.store.memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite":
        from fp_collect.store.sqlite import SQLiteStore

        rest, _, query = rest.partition("?")
        path = rest[1:] if rest.startswith("/") else rest
        if not path:
            raise ConfigError(
                f"storage URL {redact(url)!r} names no file (try 'sqlite:///events.db')"
            )
        return SQLiteStore(path, synchronous=_sqlite_synchronous(url, query), create=create)
    if scheme in ("postgresql", "postgres", "redis", "rediss"):
        _require_escaped_password(rest)
    if scheme in ("postgresql", "postgres"):
        _require_extra("psycopg", "postgres", url)
        _require_extra("psycopg_pool", "postgres", url)
        from fp_collect.store.postgres import PostgresStore

        return PostgresStore(url, create=create)
    if scheme in ("redis", "rediss"):
        _require_extra("redis", "redis", url)
        from fp_collect.store.redis_streams import RedisStore

        return RedisStore(url)
    raise ConfigError(
        f"unknown storage scheme {scheme!r} in {redact(url)!r}; use sqlite://, postgresql://, "
        "redis://, rediss:// or memory://"
    )


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, for everything shown (messages, the
    dev server's banner, reprs): the one in the user info (``scheme://user:***@host``)
    and a ``password=`` or ``sslpassword=`` option, which libpq reads from the query.
    Never fails, so a URL too malformed to parse is still shown without its secret."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _PASSWORD_OPTION.sub(r"\1***", url)
    found = _user_password(rest)
    if found is None:
        return scheme + sep + _PASSWORD_OPTION.sub(r"\1***", rest)
    user, _, after = found
    return f"{scheme}{sep}{user}:***@" + _PASSWORD_OPTION.sub(r"\1***", after)


def hide_secrets(text: str, url: str) -> str:
    """``text`` (a driver's message about ``url``) with every password ``url`` holds, as
    written or %-decoded, replaced by ``***`` inside the message's quoted parts: libpq
    quotes the part of a URL it cannot read, and that part may be the password. (Only
    there, so that a short password does not mark every place its letters appear.)"""
    secrets = [match.group(1) for match in _PASSWORD_VALUE.finditer(url)]
    found = _user_password(url.partition("://")[2])
    if found is not None:
        secrets.append(found[1])
    hidden = sorted({*secrets, *map(unquote, secrets)} - {""}, key=len, reverse=True)

    def hide(quoted: re.Match[str]) -> str:
        part = quoted.group()
        for secret in hidden:
            part = part.replace(secret, "***")
        return part

    return _QUOTED.sub(hide, text.replace(url, redact(url)))


def _require_escaped_password(rest: str) -> None:
    """Refuse a password that a URL cannot carry as it is (``rest`` follows "://"): a raw
    "/", "?", "#" or space, or a "%" that starts no escape. Drivers split such a password
    at those characters and quote a piece of it in their errors, where no redaction can
    find it; the message names no value."""
    found = _user_password(rest)
    if found is not None and _UNESCAPED.search(found[1]):
        raise ConfigError(
            "the storage URL's password must be %-escaped: write / ? # % and spaces as "
            "%2F %3F %23 %25 %20"
        )


def _user_password(rest: str) -> tuple[str, str, str] | None:
    """(user, password, what follows the "@") when ``rest``, a URL after its "://",
    has a password in its user info; else None."""
    # The host part ends at the first "/", "?" or "#"; a password may hold "@" and ":"
    # (the user info ends at the last "@", as urlsplit reads it).
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    userinfo, at, _ = rest[:end].rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        return (user, password, rest[len(userinfo) + 1 :]) if colon else None
    # A password holding a raw "/", "?" or "#" (it should be %-escaped) ends the host
    # part early, "user:pa/ss@host": that part then reads "user:" and what no port is,
    # and the user info runs to the next "@". (Not "[::1]:5432", an IPv6 host.)
    # After a "?" or "#" nothing is a port, so "user:2024?pw@host" is a password too.
    user, colon, after = rest[:end].partition(":")
    later = rest.find("@", end)
    port = after.isdigit() and rest[end : end + 1] not in ("?", "#")
    if colon and not port and not user.startswith("[") and later >= 0:
        return user, rest[len(user) + 1 : later], rest[later + 1 :]
    return None


# libpq reads an option's value up to the next "&": a "#" is part of it (no fragments).
_PASSWORD_OPTION = re.compile(r"([?&](?:ssl)?password=)[^&]*", re.IGNORECASE)
_PASSWORD_VALUE = re.compile(r"[?&](?:ssl)?password=([^&]*)", re.IGNORECASE)
_QUOTED = re.compile(r'"[^"]*"')
_UNESCAPED = re.compile(r"[/?# ]|%(?![0-9A-Fa-f]{2})")


def _require_extra(module: str, extra: str, url: str) -> None:
    """Fail with the install command when a backend's driver is missing."""
    try:
        __import__(module)
    except ImportError as exc:
        raise ConfigError(
            f"storage URL {url.partition('://')[0]}:// needs the {module!r} package: "
            f"install fp-collect's {extra!r} extra (pip install 'fp-collect[{extra}]', or"
            f" '.[{extra}]' in a checkout)"
        ) from exc


def _sqlite_synchronous(url: str, query: str) -> Literal["FULL", "NORMAL"]:
    """The ``synchronous`` a SQLite URL's query asks for (its one option)."""
    try:
        options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError as exc:
        raise ConfigError(f"storage URL {redact(url)!r} has a malformed query: {exc}") from exc
    unknown = sorted(set(options) - {"synchronous"})
    if unknown:
        raise ConfigError(
            f"storage URL {redact(url)!r}: unknown option {unknown[0]!r} (SQLite takes synchronous)"
        )
    value = options.get("synchronous", "FULL").upper()
    if value == "FULL":
        return "FULL"
    if value == "NORMAL":
        return "NORMAL"
    raise ConfigError(f"storage URL {redact(url)!r}: synchronous must be FULL or NORMAL")
