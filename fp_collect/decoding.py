"""Turning a request body into JSON values we are willing to keep.

ujson is fast but lenient: it accepts NaN and Infinity, turns 1e400 into inf, keeps
integers of any size and lets lone UTF-16 surrogates through (escaped or as raw
bytes). None of those can be stored and read back faithfully, so after parsing we
look for them, and for absurd nesting. A regex over the raw bytes finds whether any
of them can possibly be present; only then is the parsed value walked.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping
from http import HTTPStatus

import ujson

from fp_collect.errors import RequestRejected

JSONValue = object

# JSON media types we read. analytics.js sends text/plain to avoid a CORS preflight.
_JSON_MEDIA_TYPES = frozenset({"application/json", "text/plain"})
# Signed 64-bit: what SQLite, PostgreSQL bigint and most consumers can hold exactly.
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
# Any token that might parse into something we refuse: NaN/Infinity, surrogate
# escapes or raw surrogate bytes, long digit runs (possibly huge ints) and 3-digit
# exponents (possibly overflowing floats).
_SUSPICIOUS = re.compile(
    rb"NaN|Infinity|\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]|[0-9]{19}|[eE][+-]?[0-9]{3}"
)


def check_content_type(headers: Mapping[str, str]) -> None:
    """Refuse bodies that are not JSON (415). A missing Content-Type is read as JSON,
    since ``navigator.sendBeacon`` with a string sends none in some browsers."""
    raw = headers.get("content-type")
    if raw is None:
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
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
        if len(data) > limit:
            raise too_large(limit, "after decompression")
        if not inflater.eof:
            raise RequestRejected(
                HTTPStatus.BAD_REQUEST, "invalid_gzip", "the gzip body is truncated"
            )
    except zlib.error as exc:
        raise RequestRejected(
            HTTPStatus.BAD_REQUEST, "invalid_gzip", "the body is not valid gzip", str(exc)
        ) from exc
    return data


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
    try:
        value: JSONValue = ujson.loads(data)
    except (ValueError, OverflowError) as exc:
        raise RequestRejected(
            HTTPStatus.BAD_REQUEST, "invalid_json", "Invalid JSON", str(exc)[:200]
        ) from exc
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    needs_walk = _SUSPICIOUS.search(raw) is not None or (
        raw.count(b"{") + raw.count(b"[") > max_depth
    )
    if needs_walk:
        problem = find_unstorable(value, max_depth)
        if problem is not None:
            raise RequestRejected(HTTPStatus.BAD_REQUEST, "invalid_json", "Invalid JSON", problem)
    return value


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
    """Serialise compactly, keeping non-ASCII text as is (it was checked on the way in)."""
    return ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False)
