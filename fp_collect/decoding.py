"""Turning a request body into JSON values we are willing to keep.

ujson is fast but lenient: it accepts NaN and Infinity, turns 1e400 into inf, keeps
integers of any size, lets lone UTF-16 surrogates through (escaped or as raw bytes) and
reads a minus sign with no digits as 0. None of those can be stored and read back
faithfully. Walking every parsed value to find them would cost as much as the parse
itself, so the checks are split:

* non-finite numbers and surrogates make the strict serialiser (:func:`encode_event`)
  fail, and every event is serialised for storage anyway, so they cost nothing extra
  and refuse only the event that carries them;
* huge integers and deep nesting are found on the raw bytes first (a byte mapping and
  a bracket count); only a body that might hold one is walked. In a batch
  (:func:`parse_batch`) each event is walked on its own, and only the events that hold
  one are refused;
* a lone minus sign is found by the same byte mapping, and only a body where one may
  stand outside a string is scanned token by token. It is broken syntax, which no
  strict parser reads at all: the whole body is refused, as for any syntax error.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping
from http import HTTPStatus
from itertools import accumulate

import ujson

from fp_collect.errors import ItemRejected, RequestRejected

JSONValue = object

# JSON media types we read. analytics.js sends text/plain to avoid a CORS preflight.
_JSON_MEDIA_TYPES = frozenset({"application/json", "text/plain"})
# Signed 64-bit: what SQLite, PostgreSQL bigint and most consumers can hold exactly.
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
# Number shapes are found on the raw bytes mapped (one translate, ten times faster than
# a regex) to "9" for digits, "-" for minus signs, "e" for the structure around a value
# (":", "[", ",", "]", "}") and "x" for everything else, whitespace deleted. A run of 19
# digits may be an integer beyond 64 bits. A minus sign with no digits, which ujson reads
# as 0, stands between two structural bytes ("e-e"), or is the whole body: a string holds
# that shape only rarely (a page title's " - " does not), and only then is the body scanned.
_NUMBER_SHAPES = bytes(
    0x39 if 0x30 <= c <= 0x39 else 0x2D if c == 0x2D else 0x65 if c in b":[,]}" else 0x78
    for c in range(256)
)
_WHITESPACE = b" \t\r\n"
_LONG_DIGIT_RUN = b"9" * 19
_LONE_MINUS_SHAPE = b"e-e"
# To tell a lone minus sign from a string holding "- " (a page title, say): strings and
# lone minus signs as tokens, left to right. Runs only on a body the mapping flagged.
_STRING_OR_LONE_MINUS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|-(?=[ \t\r\n,\]}]|\Z)', re.DOTALL)
# For measuring nesting on the raw bytes: keep brackets, quotes and backslashes...
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'[]{}"\\')
# ...then turn openers into +1 and closers into -1 (as signed bytes).
_BRACKET_SIGNS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
# Bodies up to this size have their openers counted in place (see _shallow).
_COUNT_IN_BODY_BYTES = 4096


def check_content_type(headers: Mapping[str, str]) -> None:
    """Refuse bodies that are not JSON (415). A missing Content-Type is read as JSON,
    since ``navigator.sendBeacon`` with a string sends none in some browsers; so is an
    empty one, which WSGI servers cannot tell from a missing one."""
    raw = headers.get("content-type")
    if raw is None or not raw.strip():
        return
    media_type, _, params = raw.partition(";")
    if media_type.strip().lower() not in _JSON_MEDIA_TYPES:
        raise RequestRejected(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/json or text/plain",
            f"got {raw[:100]!r}",
        )
    charset = _charset(params)
    if charset is not None and charset not in ("utf-8", "utf8"):
        raise RequestRejected(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            "unsupported_charset",
            "the body must be UTF-8",
            f"got charset {charset[:40]!r}",
        )


def _charset(params: str) -> str | None:
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


def decompress(body: bytes, headers: Mapping[str, str], limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip`` without ever holding more than ``limit`` bytes."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("identity", ""):
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise RequestRejected(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_encoding",
            "Content-Encoding must be gzip or absent",
            f"got {encoding[:40]!r}",
        )
    parts: list[bytes] = []
    size = 0
    remaining = body
    try:
        # A gzip stream may hold several members back to back (RFC 1952 2.2).
        while remaining:
            inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            data = inflater.decompress(remaining, limit + 1 - size)
            size += len(data)
            if size > limit:
                raise too_large(limit, "after decompression")
            if not inflater.eof:
                raise RequestRejected(
                    HTTPStatus.BAD_REQUEST, "invalid_gzip", "the gzip body is truncated"
                )
            parts.append(data)
            remaining = inflater.unused_data
    except zlib.error as exc:
        raise RequestRejected(
            HTTPStatus.BAD_REQUEST, "invalid_gzip", "the body is not valid gzip", str(exc)
        ) from exc
    return b"".join(parts)


def too_large(limit: int, where: str = "") -> RequestRejected:
    detail = f"the limit is {limit} bytes" + (f" {where}" if where else "")
    return RequestRejected(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        "payload_too_large",
        "Request entity too large",
        detail,
    )


def parse_json(data: bytes | str, max_depth: int) -> JSONValue:
    """Parse strictly: invalid UTF-8, trailing data, non-finite numbers, integers
    beyond 64 bits, lone surrogates and nesting deeper than ``max_depth`` are all 400."""
    value = _loads(data)
    if _suspect(data, max_depth):
        _refuse_unstorable(value, max_depth)
    return value


def parse_batch(
    data: bytes | str, max_depth: int, items_key: str
) -> tuple[JSONValue, dict[int, str]]:
    """:func:`parse_json` for a batch body: a JSON array of events, or an object holding
    one under ``items_key``. An integer beyond 64 bits or nesting deeper than
    ``max_depth`` inside one event does not refuse the body: that event is refused
    alone, so it costs no neighbour. Returns the value and, by index, what each such
    event holds. Each event's depth is counted from the event, as on a single call."""
    value = _loads(data)
    if not _suspect(data, max_depth):
        return value, {}
    items = value.get(items_key) if isinstance(value, dict) else value
    if not isinstance(items, list):
        _refuse_unstorable(value, max_depth)  # not a batch: the body is one value
        return value, {}
    if isinstance(value, dict):
        _refuse_unstorable({k: v for k, v in value.items() if k != items_key}, max_depth)
    problems = {}
    for index, item in enumerate(items):
        problem = find_unstorable(item, max_depth)
        if problem is not None:
            problems[index] = problem
    return value, problems


def _loads(data: bytes | str) -> JSONValue:
    try:
        value: JSONValue = ujson.loads(data)
    except (ValueError, OverflowError) as exc:
        raise RequestRejected(
            HTTPStatus.BAD_REQUEST, "invalid_json", "Invalid JSON", str(exc)[:200]
        ) from exc
    return value


def _suspect(data: bytes | str, max_depth: int) -> bool:
    """Whether the JSON ``data`` (which ujson parsed) may hold an integer beyond 64 bits
    or nest deeper than ``max_depth``: only then is its parsed value walked. Refuses it
    (400) if it holds a minus sign with no digits."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    shapes = raw.translate(_NUMBER_SHAPES, _WHITESPACE)
    # rfind, not "in": searching backwards is twice as fast for this needle.
    if shapes.rfind(_LONE_MINUS_SHAPE) >= 0 or shapes == b"-":
        _refuse_lone_minus(raw)
    # With whitespace gone, digits a space apart in a string ("DE89 3704 0044 0532 ...")
    # join into a run: only a run the bytes hold as they are makes the body suspect.
    long_digits = _LONG_DIGIT_RUN in shapes and _LONG_DIGIT_RUN in raw.translate(_NUMBER_SHAPES)
    return long_digits or not _shallow(raw, max_depth)


def _refuse_lone_minus(raw: bytes) -> None:
    """Refuse ``raw`` (400) if a minus sign with no digits stands outside its strings."""
    for token in _STRING_OR_LONE_MINUS.finditer(raw):
        if token.group() == b"-":
            raise RequestRejected(
                HTTPStatus.BAD_REQUEST,
                "invalid_json",
                "Invalid JSON",
                f"a minus sign without digits at byte {token.start()}",
            )


def _refuse_unstorable(value: JSONValue, max_depth: int) -> None:
    problem = find_unstorable(value, max_depth)
    if problem is not None:
        raise RequestRejected(HTTPStatus.BAD_REQUEST, "invalid_json", "Invalid JSON", problem)


def _shallow(raw: bytes, max_depth: int) -> bool:
    """Whether valid JSON ``raw`` certainly nests no deeper than ``max_depth``.

    Works on the bytes, in C-speed passes, so that the common case needs no walk over
    the parsed value. Strings are dropped as ``""`` pairs once escapes are gone; if a
    quote survives, some string holds a bracket and only a walk can tell (False).
    """
    # Few openers: certainly shallow. A small body (a single call) is counted as it is;
    # a large one (a batch) has more openers than the limit anyway, so they are counted
    # in the projection instead, sparing two passes over the whole body.
    if len(raw) <= _COUNT_IN_BODY_BYTES and raw.count(b"{") + raw.count(b"[") <= max_depth:
        return True
    projection = raw.translate(None, _NOT_STRUCTURE)
    if projection.count(b"{") + projection.count(b"[") <= max_depth:
        return True
    if b"\\" in projection:
        projection = projection.replace(b"\\\\", b"").replace(b'\\"', b"").replace(b"\\", b"")
    # Each string is now a pair of quotes; if one is not (some string holds a bracket),
    # removing the pairs leaves a quote. Counting finds that without building a copy:
    # count() and replace() both take non-overlapping pairs from the left.
    if projection.count(b'"') != 2 * projection.count(b'""'):
        return False
    signs = memoryview(projection.translate(_BRACKET_SIGNS, b'"')).cast("b")
    return max(accumulate(signs), default=0) <= max_depth


def find_unstorable(value: JSONValue, max_depth: int) -> str | None:
    """Describe the first value that cannot be stored faithfully, or return None.

    Iterative, so hostile nesting cannot exhaust the Python stack.
    """
    stack: list[tuple[JSONValue, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > max_depth:
                return f"nesting deeper than {max_depth} levels"
            for key, child in item.items():
                if _has_surrogate(key):
                    return "a key contains a lone UTF-16 surrogate"
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth > max_depth:
                return f"nesting deeper than {max_depth} levels"
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            if _has_surrogate(item):
                return "a string contains a lone UTF-16 surrogate"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return "numbers must be finite (no NaN, Infinity or overflowing exponents)"
        elif (
            isinstance(item, int)
            and not isinstance(item, bool)
            and not _INT_MIN <= item <= _INT_MAX
        ):
            return "integers must fit in 64 bits"
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def dumps(value: JSONValue) -> str:
    """Serialise compactly and strictly, keeping non-ASCII text as is.

    Raises ValueError (OverflowError, UnicodeEncodeError) for NaN, infinities and lone
    surrogates, which no JSON reader takes back.
    """
    return ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False, allow_nan=False)


def encode_event(value: JSONValue) -> str:
    """:func:`dumps` for an event: what cannot be stored refuses that event alone.

    ujson writes lone surrogates into its output rather than failing, so the text is
    encoded once here to find them (the store would fail on them later otherwise).
    """
    try:
        text = dumps(value)
        text.encode("utf-8")
        return text
    except (ValueError, OverflowError) as exc:
        raise ItemRejected("invalid_json", f"the event cannot be stored as JSON: {exc}") from exc


def oversize_candidates(items: list[JSONValue], total_bytes: int, limit: int) -> set[int]:
    """The indexes of ``items`` (parsed from ``total_bytes`` of JSON) that may take more
    than ``limit`` bytes through :func:`encode_event`, or fail it: those to measure alone.

    Serialising each item just to measure it costs about as much as storing it. A JSON
    array is its items' encodings joined by commas, so items are measured in groups of
    about half the limit instead: when a group fits, each of its items does. Only the
    items of a group that does not fit, or cannot be encoded, are candidates.
    """
    group_size = limit // 2 // max(1, total_bytes // max(1, len(items)))
    if group_size < 2:
        return set(range(len(items)))
    candidates: set[int] = set()
    for start in range(0, len(items), group_size):
        group = items[start : start + group_size]
        if not _fits_together(group, limit):
            candidates.update(range(start, start + len(group)))
    return candidates


def _fits_together(group: list[JSONValue], limit: int) -> bool:
    """Whether every value of ``group`` passes :func:`encode_event` within ``limit``
    bytes, from one encoding of the whole group."""
    try:
        size = len(dumps(group).encode("utf-8"))
    except (ValueError, OverflowError):
        return False
    # The encoding is "[" + ",".join(items) + "]": brackets and commas are no item's.
    return size - 1 - len(group) <= limit


def dumps_lenient(value: JSONValue) -> str:
    """Serialise anything ujson parsed, for the record of a rejection: surrogates are
    escaped and NaN written out, so the record shows exactly what was refused."""
    return ujson.dumps(value, ensure_ascii=True, escape_forward_slashes=False)
