"""Wire APIs ("dialects") served by the one pipeline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fp_collect.http import Request, Response
from fp_collect.pipeline import Prepared

Handler = Callable[[Request], Prepared]
Reader = Callable[[Request], Response]


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint: which methods it answers and how to read its body.

    A collection route has a ``handler`` whose batch the collector commits; a read route
    has a ``reader`` that answers from the store (run off the event loop under ASGI).
    """

    name: str
    methods: frozenset[str]
    # The adapter stops reading (and answers 413) past this many bytes.
    max_body_bytes: int
    handler: Handler | None = None
    reader: Reader | None = None
