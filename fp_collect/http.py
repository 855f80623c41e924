"""The neutral request and response that adapters translate to and from.

Built from primitives only, so the core never sees a framework object and property
tests can construct requests directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

HeaderList = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request as the core sees it.

    ``path`` is relative to the application root the collector is mounted under
    (what follows any ``root_path``/``SCRIPT_NAME``). ``headers`` maps lower-case
    names to values; repeated headers are joined with ``", "`` as RFC 9110 allows.
    ``body_too_large`` is set by the adapter when it stopped reading because the
    body exceeded the route's limit (or Content-Length announced that it would);
    ``body`` then holds nothing useful.
    """

    method: str
    path: str
    query: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    client: str | None = None
    body_too_large: bool = False


@dataclass(frozen=True, slots=True)
class Response:
    status: HTTPStatus
    headers: HeaderList
    body: bytes

    @property
    def status_line(self) -> str:
        """The WSGI status string, e.g. ``"200 OK"``."""
        return f"{self.status.value} {self.status.phrase}"


def content_length(headers: Mapping[str, str]) -> int | None:
    """The declared body size, or None when absent or not a plain decimal number."""
    raw = headers.get("content-length")
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isdigit() or not raw.isascii():
        return None
    return int(raw)
