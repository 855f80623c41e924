"""Stream entries read back as stored events and rejections, and the read filters."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import ujson

from fp_collect.errors import StoreUnavailable
from fp_collect.store.base import Query, StoredEvent, StoredRejection


def stored_event(number: int, fields: dict[str, str]) -> StoredEvent:
    warnings = fields.get("warnings")
    return StoredEvent(
        id=number,
        source_id=fields["source_id"],
        message_id=fields["message_id"],
        type=fields["type"],
        name=fields.get("name"),
        user_id=fields.get("user_id"),
        anonymous_id=fields.get("anonymous_id"),
        timestamp=fields["timestamp"],
        received_at=fields["received_at"],
        payload=fields["payload"],
        profile_id=fields.get("profile_id"),
        session_id=fields.get("session_id"),
        warnings=tuple(ujson.loads(warnings)) if warnings else (),
    )


def stored_rejection(number: int, fields: dict[str, str]) -> StoredRejection:
    index = fields.get("index")
    return StoredRejection(
        id=number,
        source_id=fields.get("source_id"),
        reason=fields["reason"],
        message=fields["message"],
        received_at=fields["received_at"],
        endpoint=fields["endpoint"],
        payload=fields["payload"],
        index=None if index is None else int(index),
        message_id=fields.get("message_id"),
    )


def in_window(query: Query, received_at: str) -> bool:
    return (query.since is None or received_at >= query.since) and (
        query.until is None or received_at < query.until
    )


def event_matches(query: Query, row: StoredEvent) -> bool:
    return (
        (query.type is None or row.type == query.type)
        and (query.name is None or row.name == query.name)
        and (query.profile_id is None or row.profile_id == query.profile_id)
        and (not query.flagged or bool(row.warnings))
        and in_window(query, row.received_at)
    )


def rejection_matches(query: Query, row: StoredRejection) -> bool:
    return (
        (query.source_id is None or row.source_id == query.source_id)
        and (query.type is None or row.reason == query.type)
        and in_window(query, row.received_at)
    )


def take(rows: Iterable[Any], limit: int | None) -> list[Any]:
    """At most ``limit`` rows, read now: errors surface here, not in the caller's loop."""
    taken: list[Any] = []
    if limit == 0:
        return taken
    for row in rows:
        taken.append(row)
        if limit is not None and len(taken) >= limit:
            break
    return taken


def entry_number(item: tuple[int, dict[str, str]]) -> int:
    return item[0]


def check_limit(query: Query) -> None:
    if query.limit is not None and query.limit < 0:
        raise ValueError(f"limit must be None or >= 0, not {query.limit}")


def text_or_none(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise StoreUnavailable(f"unexpected Redis reply {value!r}")
