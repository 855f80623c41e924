"""NUL-safe text: PostgreSQL text cannot hold U+0000, which any JSON string may."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import psycopg
import ujson
from psycopg.abc import Buffer
from psycopg.adapt import AdaptersMap
from psycopg.types.json import Json
from psycopg.types.string import StrDumperUnknown, TextLoader

_ESCAPE = "\uffff"
_ESCAPED = re.compile(_ESCAPE + "(.)", re.DOTALL)


def escape_text(text: str) -> str:
    """Text PostgreSQL can store: U+0000 as U+FFFF "0", U+FFFF doubled. Reversible."""
    if "\x00" in text or _ESCAPE in text:
        return text.replace(_ESCAPE, _ESCAPE * 2).replace("\x00", _ESCAPE + "0")
    return text


def unescape_text(text: str) -> str:
    if _ESCAPE in text:
        return _ESCAPED.sub(lambda m: "\x00" if m[1] == "0" else m[1], text)
    return text


def json_rows(rows: Sequence[Sequence[object]]) -> Json:
    """``rows`` as one JSON array of arrays, the parameter of a set-wise statement, with
    their text made storable as :func:`escape_text` makes it. Serialised now, so the
    caller may reuse ``rows``; sent as JSON, so not escaped again as text would be."""
    return Json(_storable_json(rows), dumps=_as_is)


def _as_is(text: Any) -> str:
    assert isinstance(text, str)
    return text


def _storable_json(rows: Any) -> str:
    # ujson writes U+0000 as "\\u0000", which PostgreSQL refuses to turn into text: a
    # text holding one (or the escape character) is found in the JSON, and only then
    # is every value escaped one by one.
    text: str = ujson.dumps(rows, ensure_ascii=False, escape_forward_slashes=False)
    if "\\u0000" not in text and _ESCAPE not in text:
        return text
    escaped = [[escape_text(v) if isinstance(v, str) else v for v in row] for row in rows]
    storable: str = ujson.dumps(escaped, ensure_ascii=False, escape_forward_slashes=False)
    return storable


class _TextDumper(StrDumperUnknown):
    def dump(self, obj: str) -> Buffer | None:
        return escape_text(obj).encode(self._encoding)


class _TextLoader(TextLoader):
    def load(self, data: Buffer) -> bytes | str:
        text = super().load(data)
        return unescape_text(text) if isinstance(text, str) else text


ADAPTERS = AdaptersMap(psycopg.adapters)
ADAPTERS.register_dumper(str, _TextDumper)
for _type in ("text", "varchar", "bpchar", "name"):
    ADAPTERS.register_loader(_type, _TextLoader)
