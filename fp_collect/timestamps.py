"""ISO-8601 timestamps: strict parsing and one canonical output form.

Clients send many shapes (``Z`` or ``+00:00``, milliseconds or microseconds, no
fraction at all); we keep what they sent in ``originalTimestamp`` and write every
timestamp we produce as ``YYYY-MM-DDTHH:MM:SS.mmmZ``, which sorts as text.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache

_UTC = timezone.utc
# One pattern decides on every Python version: 3.11's fromisoformat accepts more, and
# reads "2020-01-01+05:00" differently.
_ISO = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
    r"(?:[Tt ]([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:[.,]([0-9]{1,9}))?)?)?"
    r"(?:[Zz]|([+-])([0-9]{2}):?([0-9]{2}))?"
)


# The instants format_iso can write: years 1 to 9999 in UTC.
MIN_EPOCH, MAX_EPOCH = -62135596800.0, 253402300799.999


# The same strings come back within a request (a batch's sentAt, each timestamp at
# validation and again at enrichment), so a small cache saves most of the parsing.
@lru_cache(maxsize=4096)
def parse_iso(text: str) -> float | None:
    """Epoch seconds for an ISO-8601 date or date-time, or None if ``text`` is not one
    (or names an instant outside years 1 to 9999 in UTC).

    A value without an offset is taken as UTC.
    """
    seconds = _parse_with_pattern(text)
    if seconds is None or not MIN_EPOCH <= seconds <= MAX_EPOCH:
        return None
    return seconds


def _parse_with_pattern(text: str) -> float | None:
    match = _ISO.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    try:
        moment = datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            tzinfo=_UTC,
        )
    except ValueError:
        return None
    seconds = moment.timestamp()
    if fraction:
        seconds += int(fraction) / 10 ** len(fraction)
    if sign:
        hours, minutes = int(off_h), int(off_m)
        if hours > 23 or minutes > 59:
            return None
        offset = hours * 3600 + minutes * 60
        seconds += -offset if sign == "+" else offset
    return seconds


def format_iso(epoch_seconds: float) -> str:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ`` in UTC, the one form we write (years 1 to 9999)."""
    # Whole milliseconds first: a float such as ...59.999 may be ...59.998999 inside.
    seconds, milli = divmod(round(epoch_seconds * 1000), 1000)
    # Runs about twice per event, and the events of a moment share their second: the
    # text up to the second comes from a cache, the milliseconds from a table.
    return _whole_second(seconds) + _MILLIS[milli]


@lru_cache(maxsize=1024)
def _whole_second(seconds: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` of the UTC second ``seconds`` after the epoch."""
    day, second_of_day = divmod(seconds, 86400)
    hour, rest = divmod(second_of_day, 3600)
    minute, second = divmod(rest, 60)
    return f"{_date(day)}T{hour:02d}:{minute:02d}:{second:02d}"


_MILLIS = tuple(f".{milli:03d}Z" for milli in range(1000))


@lru_cache(maxsize=1024)
def _date(day: int) -> str:
    """``YYYY-MM-DD`` of the UTC day ``day`` days after the epoch."""
    return (_EPOCH_DATE + timedelta(days=day)).isoformat()


_EPOCH_DATE = date(1970, 1, 1)
