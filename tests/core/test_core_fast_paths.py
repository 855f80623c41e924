"""The per-event fast paths (caches, shortcuts) answer exactly as the plain code did.

Each test pins a cache or shortcut of the core pipeline against a straightforward
reference: the code it replaced, kept here, or the uncached function itself.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from datetime import date, timedelta
from itertools import accumulate
from unittest import mock

from hypothesis import assume, example, given
from hypothesis import strategies as st

from fp_collect import Source
from fp_collect.auth import KeyRing, basic_username
from fp_collect.decoding import (
    _BRACKET_SIGNS,
    _NOT_STRUCTURE,
    _refuse_lone_minus,
    _shallow,
    dumps_lenient,
    encode_event,
    oversize_candidates,
    parse_json,
)
from fp_collect.errors import ConfigError, RequestRejected
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


# -- per-event size limit in a batch ------------------------------------------------------

BATCH_ITEMS = st.lists(
    st.one_of(
        st.builds(
            lambda text, number: {"type": "track", "event": text, "n": number},
            st.text(alphabet=st.sampled_from('aé€😀"\\/<\n'), max_size=120),
            st.one_of(st.integers(), st.floats()),  # NaN and infinities cannot be stored
        ),
        st.text(alphabet=st.sampled_from("a\ud800"), max_size=3),  # lone surrogates neither
        st.lists(st.integers(), max_size=3),
        st.none(),
    ),
    min_size=1,
    max_size=40,
)


@given(items=BATCH_ITEMS, limit=st.integers(1, 300), scale=st.floats(0.05, 2))
@example(items=[{"event": "a" * 20}, []], limit=31, scale=0.05)  # 32 + 2 bytes
@example(items=[{"event": "a" * 20}, {"event": "b" * 20}], limit=64, scale=0.5)
@example(items=[{"event": "a" * 20}, {"event": "b" * 20}], limit=63, scale=0.5)
@example(items=[{"n": math.nan}, {"event": "b"}], limit=100, scale=0.05)
def test_items_left_out_of_the_measure_pass_it(
    items: list[object], limit: int, scale: float
) -> None:
    """Every item that oversize_candidates vouches for encodes within the limit.

    The body's size only sets the size of the groups: ``scale`` varies it around the
    size of the items' own encoding."""
    total_bytes = int(len(dumps_lenient(items)) * scale)
    candidates = oversize_candidates(items, total_bytes, limit)
    for index, item in enumerate(items):
        if index not in candidates:
            assert len(encode_event(item).encode()) <= limit, (index, item)


def test_items_are_vouched_for_in_groups() -> None:
    """The shortcut does its job: small items in a large body are not measured one by
    one; the one too large, and its group, are."""
    items: list[object] = [{"event": f"e{i}"} for i in range(100)]
    assert oversize_candidates(items, 1_500, 150) == set()
    items[42] = {"event": "x" * 200}
    candidates = oversize_candidates(items, 1_700, 150)
    assert 42 in candidates
    assert len(candidates) < 10
    # Items of about the limit's size are all measured.
    assert oversize_candidates(items, 1_700 * 100, 150) == set(range(100))


# -- authentication -----------------------------------------------------------------------


def reference_basic_username(authorization: str | None) -> str | None:
    """basic_username before its cache."""
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    username, _, _password = decoded.partition(":")
    return username or None


def basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode("utf-8", "surrogatepass")).decode()


HEADERS = st.one_of(
    st.none(),
    st.text(max_size=20),
    st.text(max_size=12).map(basic),
    st.tuples(st.text(max_size=8), st.text(max_size=600)).map(lambda p: basic(f"{p[0]}:{p[1]}")),
    st.sampled_from(["basic  a2V5Og==", "Bearer a2V5Og==", "Basic a2V5Og", " BASIC a2V5Og== "]),
)


@given(headers=st.lists(HEADERS, max_size=8))
@example(headers=[basic("key:"), basic("key:"), basic("other:" + "x" * 600), basic("k\ud800:")])
def test_basic_username_matches_the_uncached_decoder(headers: list[str | None]) -> None:
    for header in headers + headers:
        assert basic_username(header) == reference_basic_username(header), header


@given(
    keys=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=4, unique=True),
    enabled=st.lists(st.booleans(), min_size=4, max_size=4),
    others=st.lists(st.one_of(st.text(max_size=7), st.none(), st.integers()), max_size=10),
)
@example(keys=["key", "Key"], enabled=[True, False, True, True], others=[])
def test_a_key_ring_answers_the_same_once_it_remembers_keys(
    keys: list[str], enabled: list[bool], others: list[object]
) -> None:
    """Only an enabled source's exact key resolves, before and after the ring has seen
    it: near misses (case, prefix, suffix, spaces) and disabled sources' keys stay
    unknown however often the real keys were presented."""
    try:
        sources = [
            Source(write_key=key, id=f"s{index}", enabled=on)
            for index, (key, on) in enumerate(zip(keys, enabled, strict=False))
        ]
    except ConfigError:
        assume(False)
    ring = KeyRing(sources)
    near: list[object] = []
    for key in keys:
        near += [key.upper(), key.lower(), key + "x", key[:-1], f" {key}", key * 2]
    for presented in [*keys, *near, *others, *keys, *near]:
        expected = next(
            (s for s in sources if s.enabled and s.write_key == presented),
            None,
        )
        assert ring.resolve(presented) is expected, presented


# -- nesting depth on the raw bytes -------------------------------------------------------


def reference_shallow(raw: bytes, max_depth: int) -> bool:
    """_shallow before it counted openers in the projection."""
    if raw.count(b"{") + raw.count(b"[") <= max_depth:
        return True
    projection = raw.translate(None, _NOT_STRUCTURE)
    if b"\\" in projection:
        projection = projection.replace(b"\\\\", b"").replace(b'\\"', b"").replace(b"\\", b"")
    projection = projection.replace(b'""', b"")
    if b'"' in projection:
        return False
    signs = memoryview(projection.translate(_BRACKET_SIGNS)).cast("b")
    return max(accumulate(signs), default=0) <= max_depth


JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.integers(),
        st.text(alphabet=st.sampled_from('ab[]{}"\\/é'), max_size=6),
    ),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(alphabet=st.sampled_from('k[{"\\'), max_size=3), children, max_size=4
        )
    ),
    max_leaves=30,
)


@given(value=JSON_VALUES, max_depth=st.integers(0, 8), padding=st.sampled_from([0, 5000]))
@example(value=[[["a"]], {"k": '"[['}], max_depth=2, padding=5000)
@example(value=[[[[[]]]]], max_depth=4, padding=5000)
@example(value=[[[[]]], [[[]]]], max_depth=4, padding=5000)  # exactly the limit
def test_shallow_answers_as_before(value: object, max_depth: int, padding: int) -> None:
    """Bodies above and below the size where openers are counted in the projection."""
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False, indent=1)):
        raw = (text + " " * padding).encode()
        assert _shallow(raw, max_depth) == reference_shallow(raw, max_depth), raw[:200]


# -- the lone minus sign ----------------------------------------------------------------


def lone_minus_everywhere(raw: bytes) -> bool:
    """The reference: scan every body token by token (what the byte shapes spare)."""
    try:
        _refuse_lone_minus(raw)
    except RequestRejected:
        return True
    return False


MINUS_TEXT = st.sampled_from(["-", " - ", "a - b", "[-]", ":-,", '\\" -', "-}", "x-"])
minus_values = st.recursive(
    st.one_of(st.none(), st.integers(-5, 5), st.floats(-1, 1), st.text(max_size=6), MINUS_TEXT),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(MINUS_TEXT, inner, max_size=3),
    max_leaves=8,
)


@given(value=minus_values, lone=st.booleans(), spaced=st.booleans())
@example(value={"title": "Checkout - Shop"}, lone=False, spaced=False)
def test_the_lone_minus_shortcut_answers_as_a_full_scan(
    value: object, lone: bool, spaced: bool
) -> None:
    """A body is refused for a minus sign with no digits exactly when a scan of all its
    tokens finds one, strings holding any dash, bracket or comma included."""
    text = json.dumps([value, "MINUS"] if lone else value, indent=1 if spaced else None)
    if lone:
        text = text.replace('"MINUS"', "-")
    raw = text.encode()
    try:
        parse_json(raw, 64)
        refused = False
    except RequestRejected:
        refused = True
    assert refused == lone_minus_everywhere(raw) == lone


def test_a_dash_in_a_page_title_costs_no_scan() -> None:
    """analytics.js sends the page title with every event, and titles hold " - "
    ("Checkout - Shop"): such a body is never scanned token by token."""
    body = json.dumps(
        {"batch": [{"context": {"page": {"title": "Checkout - Shop"}}, "n": -1}] * 50}
    ).encode()
    with mock.patch("fp_collect.decoding._refuse_lone_minus") as scan:
        parse_json(body, 64)
    assert scan.call_count == 0
    for broken in (b'{"n": -}', b"-", b" -\n", b"[1,\n -\n]"):
        with mock.patch("fp_collect.decoding._refuse_lone_minus") as scan:
            parse_json(broken, 64)
        assert scan.call_count == 1, broken


def test_digits_a_space_apart_make_no_body_suspect() -> None:
    """An IBAN or a list of years in a string is no long integer: the parsed body is not
    walked for one (the byte shapes drop whitespace, which joins such digits)."""
    body = json.dumps({"iban": "DE89 3704 0044 0532 0130 00", "years": "2019 2020 2021"})
    with mock.patch("fp_collect.decoding._refuse_unstorable") as walk:
        parse_json(body.encode(), 64)
    assert walk.call_count == 0
    with mock.patch("fp_collect.decoding._refuse_unstorable") as walk:
        parse_json(b'{"n": 12345678901234567890}', 64)
    assert walk.call_count == 1
