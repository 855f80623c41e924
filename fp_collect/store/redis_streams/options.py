"""A ``redis://`` storage URL: this store's options, and the rest for redis-py."""

from __future__ import annotations

import math
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fp_collect.errors import ConfigError

# The one redaction every URL shown goes through; re-exported for this store's messages.
from fp_collect.store import redact as redact

DEFAULT_PREFIX = "fp:"

DEFAULT_CLAIM_GRACE = 86400.0

# Bounds on every socket operation; redis-py's own default (none before 6.0) would let a
# stalled server hold a request forever.
DEFAULT_TIMEOUTS = {"socket_timeout": "3", "socket_connect_timeout": "2"}

OPTIONS = ("prefix", "maxlen", "claim_grace")


def split_options(url: str) -> tuple[str, dict[str, str]]:
    """The URL for redis-py (with default timeouts) and our own options."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL", say
        raise ConfigError(f"Redis storage URL {redact(url)!r} is malformed: {exc}") from None
    given: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in given:
            raise ConfigError(f"Redis storage URL {redact(url)!r} gives {name!r} twice")
        given[name] = value
    ours = {name: value for name, value in given.items() if name in OPTIONS}
    # RESP2 by default: every Redis since 5.0 speaks it; the URL may ask for protocol=3.
    theirs = {**DEFAULT_TIMEOUTS, "protocol": "2"}
    theirs.update((name, value) for name, value in given.items() if name not in OPTIONS)
    return urlunsplit(parts._replace(query=urlencode(theirs))), ours


def positive_int(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"Redis storage option {name} must be a positive integer, not {value!r}")
    return number


def parse_grace(value: str | None) -> float:
    if value is None:
        return DEFAULT_CLAIM_GRACE
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(f"Redis storage option claim_grace must be seconds >= 0, not {value!r}")
    return seconds
