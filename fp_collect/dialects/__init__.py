"""Wire APIs ("dialects") served by the one pipeline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fp_collect.http import Request
from fp_collect.pipeline import Prepared

Handler = Callable[[Request], Prepared]


@dataclass(frozen=True, slots=True)
class Route:
    """One collection endpoint: which methods it answers and how to read its body."""

    name: str
    methods: frozenset[str]
    # The adapter stops reading (and answers 413) past this many bytes.
    max_body_bytes: int
    handler: Handler
