"""NUL-safe text: PostgreSQL text cannot hold U+0000, which any JSON string may."""

from __future__ import annotations

import re

import psycopg
from psycopg.abc import Buffer
from psycopg.adapt import AdaptersMap
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
