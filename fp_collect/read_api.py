"""The read API: stored events by source, rejections, and profiles, for a read token.

``GET /events?source_id=...`` (the seeds: "query Events by supplying a SourceId") with
filters and cursor pagination, ``GET /rejections`` (what was refused, and why: the
Firstparty API answers 200 to everything, so this is where its problems show) and
``GET /profiles/{id}``. Unlike collection, reading
needs ``Authorization: Bearer <read token>``; write keys, which every page carries in
the clear, never grant it. The API is off until a read token is configured.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import replace
from http import HTTPStatus
from urllib.parse import parse_qs

from fp_collect import responses
from fp_collect.decoding import dumps
from fp_collect.dialects import Route
from fp_collect.http import Request, Response
from fp_collect.store.base import Query, Store, StoredEvent
from fp_collect.timestamps import format_iso, parse_iso

DEFAULT_PAGE = 100
MAX_PAGE = 1000
PROFILES_PATH = "/profiles/"
_UNAUTHORIZED = responses.json_response(
    HTTPStatus.UNAUTHORIZED,
    {"error": "unauthorized", "message": "a valid read token is required (Bearer)"},
    [("www-authenticate", 'Bearer realm="fp-collect"')],
)
_GET = frozenset({"GET"})


class ReadAPI:
    def __init__(self, tokens: tuple[str, ...], store: Callable[[], Store]) -> None:
        self._tokens = tuple(token.encode() for token in tokens)
        # The collector's store, looked up per call so a replaced store is honoured.
        self._store = store

    def routes(self) -> dict[str, Route]:
        return {
            "/events": Route("read/events", _GET, 0, reader=self.events),
            "/rejections": Route("read/rejections", _GET, 0, reader=self.rejections),
        }

    def profile_route(self) -> Route:
        return Route("read/profile", _GET, 0, reader=self.profile)

    def _authorised(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        presented = token.strip().encode("utf-8", "surrogateescape")
        # Compare with every token, always, so the time taken reveals nothing.
        matches = [hmac.compare_digest(presented, known) for known in self._tokens]
        return any(matches)

    def events(self, request: Request) -> Response:
        if not self._authorised(request):
            return _UNAUTHORIZED
        params = {k: v[-1] for k, v in parse_qs(request.query, keep_blank_values=True).items()}
        try:
            query = _events_query(params)
        except ValueError as exc:
            return _bad_request(str(exc))
        rows = list(self._store().events(query))
        more = query.limit is not None and len(rows) == query.limit
        body = (
            '{"events":['
            + ",".join(_event_json(row) for row in rows)
            + '],"next_cursor":'
            + (f'"{rows[-1].id}"' if more else "null")
            + "}"
        )
        return Response(HTTPStatus.OK, list(responses.JSON_HEADERS), body.encode())

    def rejections(self, request: Request) -> Response:
        if not self._authorised(request):
            return _UNAUTHORIZED
        params = {k: v[-1] for k, v in parse_qs(request.query, keep_blank_values=True).items()}
        try:
            query = _page_query(params, source_required=False, type_param="reason")
        except ValueError as exc:
            return _bad_request(str(exc))
        rows = list(self._store().rejections(query))
        more = query.limit is not None and len(rows) == query.limit
        return responses.json_response(
            HTTPStatus.OK,
            {
                "rejections": [
                    {
                        "id": row.id,
                        "source_id": row.source_id,
                        "reason": row.reason,
                        "message": row.message,
                        "received_at": row.received_at,
                        "endpoint": row.endpoint,
                        "index": row.index,
                        "message_id": row.message_id,
                        "payload": row.payload,
                    }
                    for row in rows
                ],
                "next_cursor": str(rows[-1].id) if more else None,
            },
        )

    def profile(self, request: Request) -> Response:
        if not self._authorised(request):
            return _UNAUTHORIZED
        profile_id = request.path.rsplit(PROFILES_PATH, 1)[-1]
        found = self._store().profile(profile_id) if profile_id else None
        if found is None:
            return responses.json_response(
                HTTPStatus.NOT_FOUND, {"error": "not_found", "message": "no such profile"}
            )
        return responses.json_response(
            HTTPStatus.OK,
            {
                "id": found.id,
                "workspace": found.scope,
                "created_at": format_iso(found.created_at),
                "traits": found.traits,
                "identities": [{"kind": i.kind, "value": i.value} for i in found.identities],
            },
        )


def _events_query(params: dict[str, str]) -> Query:
    return replace(
        _page_query(params, source_required=True, type_param="type"),
        name=params.get("event") or None,
        profile_id=params.get("profile_id") or None,
        flagged=_flag(params.get("flagged"), "flagged"),
    )


def _page_query(params: dict[str, str], *, source_required: bool, type_param: str) -> Query:
    """What events and rejections share: source, type (or reason), time window, page."""
    source_id = params.get("source_id") or None
    if source_required and source_id is None:
        raise ValueError("source_id is required")
    limit = _integer(params.get("limit"), "limit", DEFAULT_PAGE)
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be from 1 to {MAX_PAGE}")
    return Query(
        source_id=source_id,
        type=params.get(type_param) or None,
        since=_instant(params.get("since"), "since"),
        until=_instant(params.get("until"), "until"),
        after_id=_integer(params.get("cursor"), "cursor", 0),
        limit=limit,
    )


def _integer(raw: str | None, name: str, default: int) -> int:
    if not raw:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise ValueError(f"{name} must be a whole number")
    return int(raw)


def _flag(raw: str | None, name: str) -> bool:
    if raw in (None, "", "false", "0"):
        return False
    if raw in ("true", "1"):
        return True
    raise ValueError(f"{name} must be true or false")


def _instant(raw: str | None, name: str) -> str | None:
    if not raw:
        return None
    seconds = parse_iso(raw)
    if seconds is None:
        raise ValueError(f"{name} must be an ISO-8601 time")
    return format_iso(seconds)


def _event_json(row: StoredEvent) -> str:
    # The stored payload is spliced in as kept, not parsed and re-encoded.
    meta = dumps(
        {
            "id": row.id,
            "source_id": row.source_id,
            "message_id": row.message_id,
            "type": row.type,
            "name": row.name,
            "profile_id": row.profile_id,
            "session_id": row.session_id,
            "timestamp": row.timestamp,
            "received_at": row.received_at,
            "warnings": list(row.warnings),
        }
    )
    return meta[:-1] + ',"event":' + row.payload + "}"


def _bad_request(message: str) -> Response:
    return responses.json_response(
        HTTPStatus.BAD_REQUEST, {"error": "bad_request", "message": message}
    )
