"""ISO-8601 timestamps: strict parsing and one canonical output form.

Clients send many shapes (``Z`` or ``+00:00``, milliseconds or microseconds, no
fraction at all); we keep what they sent in ``originalTimestamp`` and write every
timestamp we produce as ``YYYY-MM-DDTHH:MM:SS.mmmZ``, which sorts as text.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

_ISO = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?)?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))?"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def parse_iso(text: str) -> float | None:
    """Epoch seconds for an ISO-8601 date or date-time, or None if ``text`` is not one.

    A value without an offset is taken as UTC.
    """
    match = _ISO.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, _zulu, sign, off_h, off_m = match.groups()
    try:
        moment = datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            tzinfo=timezone.utc,
        )
    except ValueError:
        return None
    seconds = (moment - _EPOCH).total_seconds()
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
    """``YYYY-MM-DDTHH:MM:SS.mmmZ`` in UTC, the one form we write."""
    moment = _EPOCH + timedelta(milliseconds=round(epoch_seconds * 1000))
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
