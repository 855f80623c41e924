"""Write-key authentication.

Keys are looked up by their SHA-256 digest and then compared with
``hmac.compare_digest``, so the time taken does not reveal how much of a guessed key
was right. Unknown, missing and disabled keys are indistinguishable to the caller.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable
from functools import lru_cache
from http import HTTPStatus

from fp_collect.config import Source
from fp_collect.errors import RequestRejected

INVALID_WRITE_KEY_MESSAGE = "Invalid or missing writekey"


def invalid_write_key() -> RequestRejected:
    return RequestRejected(HTTPStatus.BAD_REQUEST, "invalid_write_key", INVALID_WRITE_KEY_MESSAGE)


class KeyRing:
    """Resolves presented write keys to enabled sources.

    The sources are fixed for the ring's life (a collector builds one from its frozen
    configuration), so a key once verified stays valid: it is remembered, and the same
    key presented again costs one dict lookup instead of a SHA-256 and a comparison.
    Only verified keys are remembered, so the memory holds at most one entry per
    source, and unknown keys always take the digest path. The lookup by the key itself
    tells a wrong guess nothing: str hashes are keyed (SipHash) and the string
    comparison only runs on a full hash match.
    """

    def __init__(self, sources: Iterable[Source]) -> None:
        self._by_digest = {_digest(s.write_key): s for s in sources if s.enabled}
        self._verified: dict[str, Source] = {}

    def resolve(self, key: object) -> Source | None:
        """The enabled source owning ``key``, or None for anything else."""
        if not isinstance(key, str) or not key:
            return None
        source = self._verified.get(key)
        if source is None:
            source = self._by_digest.get(_digest(key))
            if source is None or not hmac.compare_digest(source.write_key.encode(), key.encode()):
                return None
            self._verified[source.write_key] = source
        return source


def basic_username(authorization: str | None) -> str | None:
    """The username of an ``Authorization: Basic`` header, or None.

    The Segment-spec libraries send ``base64("<writeKey>:")``; the password is ignored.
    Other schemes (Bearer) yield None so a ``writeKey`` in the body can still be used.
    """
    if not authorization:
        return None
    if len(authorization) <= _MAX_CACHED_HEADER:
        return _decoded_username(authorization)
    return _username(authorization)


# Every request of a client carries the same header, so decoding it is cached; a long
# one is decoded every time instead, so that hostile clients cannot fill the cache with
# large strings. A pure function of the header: nothing to invalidate.
_MAX_CACHED_HEADER = 512


@lru_cache(maxsize=1024)
def _decoded_username(authorization: str) -> str | None:
    return _username(authorization)


def _username(authorization: str) -> str | None:
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    username, _, _password = decoded.partition(":")
    return username or None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
