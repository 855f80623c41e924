"""The one decision every store makes for an event, from what it knows.

Is it a copy of a stored message? Is one of its claims held? Which profile and session
does it belong to? The memory store decides with everything it holds; the SQL stores'
group paths with what they looked up for the whole group, inside the transaction that
writes it. Written once, so that the stores cannot come to differ.
"""

from __future__ import annotations

from fp_collect.store.base import (
    DUPLICATE,
    EventRecord,
    Outcome,
    claim_is_held,
)
from fp_collect.store.identity import IdentityGraph, resolve_event

ClaimKey = tuple[str, str, str]


def decide(
    event: EventRecord,
    stored: set[tuple[str, str]],
    held: dict[ClaimKey, float | None],
    graph: IdentityGraph,
) -> Outcome:
    """What becomes of ``event``.

    ``stored`` holds the (source, message id) of every stored event, ``held`` the
    ``until`` of every claim ever taken, by (source, kind, key): absent, never taken.
    A copy of a stored message is a duplicate even when one of its claims is held too.
    An event to be stored has its profile and session resolved in ``graph`` (which
    creates, attaches and merges there), and adds its entries to ``stored`` and
    ``held``; one refused changes nothing.
    """
    source_id = event.source_id
    if (source_id, event.message_id) in stored:
        return DUPLICATE
    for claim in event.claims:
        key = (source_id, claim.kind, claim.key)
        if key in held and claim_is_held(held[key], claim.at):
            return Outcome(False, claim.kind)
    outcome = resolve_event(graph, event)
    if outcome.stored:
        stored.add((source_id, event.message_id))
        for claim in event.claims:
            held[(source_id, claim.kind, claim.key)] = claim.until
    return outcome
