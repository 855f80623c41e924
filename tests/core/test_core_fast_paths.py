"""The per-event fast paths (caches, shortcuts) answer exactly as the plain code did.

Each test pins a cache or shortcut of the core pipeline against a straightforward
reference: the code it replaced, kept here, or the uncached function itself.
"""

from __future__ import annotations

import math
from datetime import date, timedelta

from hypothesis import example, given
from hypothesis import strategies as st

from fp_collect.timestamps import MAX_EPOCH, MIN_EPOCH, format_iso

# -- format_iso -------------------------------------------------------------------------


def reference_format_iso(epoch_seconds: float) -> str:
    """format_iso before its per-second cache."""
    millis = round(epoch_seconds * 1000)
    seconds, milli = divmod(millis, 1000)
    day, second_of_day = divmod(seconds, 86400)
    hour, rest = divmod(second_of_day, 3600)
    minute, second = divmod(rest, 60)
    day_text = (date(1970, 1, 1) + timedelta(days=day)).isoformat()
    return f"{day_text}T{hour:02d}:{minute:02d}:{second:02d}.{milli:03d}Z"


def outcome(function: object, value: float) -> tuple[str, str]:
    """What ``function(value)`` returns, or the type of what it raises."""
    assert callable(function)
    try:
        return ("value", function(value))
    except (ValueError, OverflowError) as exc:
        return ("raises", type(exc).__name__)


# Instants at and around the places where the cached prefix must change or round.
EDGES = [
    0.0,
    -0.0,
    0.0005,
    -0.0005,
    0.9995,
    0.9994999,
    -0.0004,
    -0.001,
    -1.0,
    59.9995,
    86399.9995,
    86400.0,
    -86400.0005,
    1_700_000_000.9995,
    1_700_000_000.999,
    1_700_000_000.0004999,
    951_782_399.9996,  # 2000-02-28T23:59:59.9996 -> Feb 29th
    MIN_EPOCH,
    MIN_EPOCH - 0.0004,
    MIN_EPOCH - 0.001,
    MAX_EPOCH,
    MAX_EPOCH + 0.0004,
    MAX_EPOCH + 0.0006,
    MAX_EPOCH + 1,
    1e300,
    -1e300,
    math.inf,
    -math.inf,
    math.nan,
]


def test_format_iso_matches_the_uncached_code_at_the_edges() -> None:
    for value in EDGES:
        # Twice: the first call may fill the cache, the second reads it.
        assert outcome(format_iso, value) == outcome(reference_format_iso, value), value
        assert outcome(format_iso, value) == outcome(reference_format_iso, value), value


@given(
    base=st.floats(min_value=MIN_EPOCH - 2, max_value=MAX_EPOCH + 2),
    steps=st.lists(st.integers(min_value=-2500, max_value=2500), max_size=8),
)
@example(base=1_700_000_000.0, steps=[999, 1000, 1001, -1, -1000, -1001])
@example(base=-0.5, steps=[499, 500, 501, -500, -501])
def test_format_iso_matches_the_uncached_code(base: float, steps: list[int]) -> None:
    """Any instant, and instants a few milliseconds to seconds around it (which share or
    straddle a cached second), is written as before; out of range still raises."""
    for value in [base, *(base + step / 1000 for step in steps), base]:
        assert outcome(format_iso, value) == outcome(reference_format_iso, value), value
