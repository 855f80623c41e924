"""Errors that carry the HTTP answer they should produce (the h11 habit)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from http import HTTPStatus
from typing import TypeVar, cast

_T = TypeVar("_T")


class ConfigError(ValueError):
    """The collector's configuration is invalid; raised eagerly at start-up."""


def config_tuple(value: Iterable[_T], what: str, *, one_string: bool = False) -> tuple[_T, ...]:
    """A collection given in the configuration, as a tuple: a ConfigError naming it,
    not a bare TypeError, when it is not a collection at all (None, a lone object).
    ``one_string``: a string alone is one entry (a name, an origin), not its letters."""
    if one_string and isinstance(value, str):
        return cast("tuple[_T, ...]", (value,))
    try:
        return tuple(value)
    except TypeError:
        raise ConfigError(f"{what} must be a list or tuple, not {type(value).__name__}") from None


# The longest window an option in seconds may give (sessions, email-open throttle, the
# future a timestamp may claim): a year is far beyond any real use, and a bound keeps
# every "at + window" a time the stores (and Redis's expiry in milliseconds) can hold.
MAX_WINDOW_SECONDS = 366 * 86400.0


def check_seconds(
    value: object, what: str, maximum: float, *, zero: bool = False, none: bool = False
) -> float:
    """``value`` if it is a finite number of seconds, more than 0 (or 0 itself when
    ``zero``), at most ``maximum``; a ConfigError naming ``what`` otherwise. True and
    False are not numbers here, nor is a string such as "1800" (as a file may hold).
    ``none``: the message says None is accepted too (the caller lets it through)."""
    low = "0 or more" if zero else "more than 0"
    also = " (or None)" if none else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number of seconds{also}, not {type(value).__name__}")
    # An int is finite however long (math.isfinite would overflow on 10**400).
    finite = isinstance(value, int) or math.isfinite(value)
    if not (finite and (value >= 0 if zero else value > 0) and value <= maximum):
        raise ConfigError(
            f"{what} must be seconds, {low} and at most {maximum:.0f}{also}, got {shown(value)}"
        )
    return float(value)


def check_bool(value: object, what: str) -> None:
    """Only True or False: any other value (the string "false" from a config file, 0,
    None) would be read for its truthiness and could leave a switch on."""
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be True or False, not {type(value).__name__}")


def shown(value: object) -> str:
    """``repr(value)`` for a message, short: an integer too long to be any setting is
    described by its size (Python will not even write one of more than 4,300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class RequestRejected(Exception):
    """A whole request is refused.

    ``reason`` is a stable machine code (stored with the rejection and returned as
    ``code``); ``message`` is for humans; ``status`` is the HTTP status to answer.
    """

    def __init__(
        self,
        status: HTTPStatus,
        reason: str,
        message: str,
        details: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.details = details


class ItemRejected(Exception):
    """One event is refused; its neighbours in the same batch are unaffected."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def as_request(self) -> RequestRejected:
        """The same refusal when the event is the whole request (a single call): 400."""
        return RequestRejected(HTTPStatus.BAD_REQUEST, self.reason, self.message)


class Discarded(Exception):
    """A valid event that a restriction removes (a crawler's, a repeated confirmation):
    answered like an accepted one, so the client does not retry it, and recorded with
    ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class StoreUnavailable(Exception):
    """The store could not commit in time; the request is answered 503, never 2xx."""
