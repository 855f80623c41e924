"""The Firstparty Events API (seeds 000-002): ``/events/track`` and ``/events/track/bulk``.

A minimal payload, ``{"event": "Form Completed", "write_key": "..."}``, with optional
``profile_id``, ``session_id``, ``properties`` and ``context``. Profiles and sessions
are created on the fly and their IDs returned. The seed promises that every request is
answered ``200 OK``: problems never show in the status, so each one is recorded with
the raw payload and its reason (``fp-collect rejections``), and named in the body.
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus

from fp_collect import responses
from fp_collect.auth import invalid_write_key
from fp_collect.config import Source
from fp_collect.decoding import encode_event, oversize_candidates
from fp_collect.dialects import Route
from fp_collect.errors import Discarded, ItemRejected, RequestRejected
from fp_collect.http import Request, Response
from fp_collect.pipeline import Incoming, Message, Pipeline, Prepared
from fp_collect.restrictions import DUPLICATE_ORDER, EMAIL_OPEN_THROTTLED
from fp_collect.store.base import (
    Batch,
    Claim,
    EventRecord,
    Identity,
    IdentityOp,
    Outcome,
    SessionOp,
)
from fp_collect.store.identity import email_identity, new_id
from fp_collect.timestamps import parse_iso

# Longest profile or session id a client may choose (ours are 32 characters).
MAX_OWN_ID_LENGTH = 64
_UNAVAILABLE = responses.json_response(
    HTTPStatus.SERVICE_UNAVAILABLE,
    responses.single_error(
        HTTPStatus.SERVICE_UNAVAILABLE, "store_unavailable", "The event store is unavailable"
    ),
    [("retry-after", "5")],
)


def routes(pipeline: Pipeline) -> dict[str, Route]:
    api = FirstpartyAPI(pipeline)
    post = frozenset({"POST"})
    return {
        "/events/track": Route("events/track", post, pipeline.limits.max_call_bytes, api.track),
        "/events/track/bulk": Route(
            "events/track/bulk", post, pipeline.limits.max_batch_bytes, api.bulk
        ),
    }


class FirstpartyAPI:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.limits = pipeline.limits

    def track(self, request: Request) -> Prepared:
        incoming = self.pipeline.incoming(request)
        payload: bytes | str = request.body
        source: Source | None = None
        try:
            payload = self.pipeline.read_body(request, self.limits.max_call_bytes)
            message = self.pipeline.parse_object(payload)
            source = self._source(request, message.get("write_key"))
            event = self._event(message, source, incoming)
        except RequestRejected as rejected:
            return self._refused(rejected, incoming, payload, source)
        except ItemRejected as rejected:
            return self._refused(rejected.as_request(), incoming, payload, source)
        except Discarded as discarded:
            record = self.pipeline.item_rejection(
                discarded, incoming, message, None, source, message.get("message_id")
            )
            answer = responses.json_response(HTTPStatus.OK, _discarded(discarded.reason))
            return Prepared(Batch(rejections=[record]), lambda _outcomes: answer, _UNAVAILABLE)

        def respond(outcomes: Sequence[Outcome]) -> Response:
            return responses.json_response(HTTPStatus.OK, _result(outcomes[0]))

        return Prepared(Batch(events=[event]), respond, _UNAVAILABLE)

    def bulk(self, request: Request) -> Prepared:
        """A JSON array of events, or ``{"events": [...]}`` whose top-level ``write_key``
        applies to events that carry none."""
        incoming = self.pipeline.incoming(request)
        payload: bytes | str = request.body
        try:
            payload = self.pipeline.read_body(request, self.limits.max_batch_bytes)
            body, unstorable = self.pipeline.parse_batch(payload, "events")
            shared_key: object = None
            if isinstance(body, dict):
                shared_key = body.get("write_key")
                body = body.get("events")
            if not isinstance(body, list):
                raise RequestRejected(
                    HTTPStatus.BAD_REQUEST,
                    "invalid_batch",
                    'the body must be an array of events or {"events": [...]}',
                )
            if not body:
                raise RequestRejected(
                    HTTPStatus.BAD_REQUEST, "empty_batch", "there are no events to collect"
                )
            self.pipeline.check_batch_size(len(body))
            # Each event's source, resolved once, before anything is checked, so that every
            # refusal is its source's. With none valid, the body is refused once.
            header_key = self.pipeline.request_credential(request)
            sources = [
                self.pipeline.keys.resolve(_event_key(item, header_key, shared_key))
                for item in body
            ]
            if not any(sources):
                raise invalid_write_key()
        except RequestRejected as rejected:
            return self._refused(rejected, incoming, payload, None)

        batch = Batch()
        # Per item: the position of its event in batch.events, or its error.
        slots: list[int | dict[str, object]] = []
        max_event = self.limits.max_event_bytes
        # As /v1/batch: only items a measure of their group cannot vouch for are measured.
        to_measure = (
            oversize_candidates(body, len(payload), max_event)
            if len(payload) > max_event
            else frozenset()
        )
        for index, (item, source) in enumerate(zip(body, sources, strict=True)):
            try:
                if index in unstorable:
                    raise ItemRejected(
                        "invalid_json", f"the event cannot be stored as JSON: {unstorable[index]}"
                    )
                if index in to_measure and len(encode_event(item).encode()) > max_event:
                    raise ItemRejected("event_too_large", f"event larger than {max_event} bytes")
                if not isinstance(item, dict):
                    raise ItemRejected("invalid_event", "each event must be a JSON object")
                if source is None:
                    raise invalid_write_key()
                event = self._event(item, source, incoming)
                event.index = index
                batch.events.append(event)
                slots.append(len(batch.events) - 1)
            except (RequestRejected, ItemRejected, Discarded) as rejected:
                raw_id = item.get("message_id") if isinstance(item, dict) else None
                if isinstance(rejected, Discarded):
                    slots.append(_discarded(rejected.reason))
                else:
                    slots.append(_error(rejected.reason, rejected.message))
                record = self.pipeline.item_rejection(
                    rejected, incoming, item, index, source, raw_id
                )
                if self.pipeline.keeps(record):
                    batch.rejections.append(record)

        def respond(outcomes: Sequence[Outcome]) -> Response:
            results = [
                {"index": index, **(_result(outcomes[slot]) if isinstance(slot, int) else slot)}
                for index, slot in enumerate(slots)
            ]
            success = all(result["success"] for result in results)
            return responses.json_response(HTTPStatus.OK, {"success": success, "events": results})

        return Prepared(batch, respond, _UNAVAILABLE)

    # -- shared steps -----------------------------------------------------------------

    def _source(self, request: Request, body_key: object) -> Source:
        header_key = self.pipeline.request_credential(request)
        return self.pipeline.authenticate(header_key if header_key is not None else body_key)

    def _event(self, message: Message, source: Source, incoming: Incoming) -> EventRecord:
        self.pipeline.check_origin(source, incoming)
        name = normalise_event(message, self.limits.max_message_id_length)
        message.pop("write_key", None)
        bot_warnings = self.pipeline.check_bot(source, incoming)
        at = self.pipeline.enrich(message, incoming)
        message, warnings = self.pipeline.apply_rules(message, source)
        name = message["event"]  # rules may rename it, never remove it
        profile_id = message.get("profile_id")
        session_id = message.get("session_id")
        identities = [
            Identity(kind, value)
            for kind in ("user_id", "anonymous_id")
            if isinstance(value := message.get(kind), str)
        ]
        email = email_identity(message.get("email"))
        if email is not None:
            identities.append(email)
        identity = IdentityOp(
            scope=source.workspace,
            at=incoming.received,
            identities=tuple(identities),
            profile_id=profile_id,
        )
        claims: tuple[Claim, ...] = ()
        claim_warnings: tuple[str, ...] = ()
        restricted = source.restrictions.kind_of(name)
        if restricted is not None:
            claims, claim_warnings = source.restrictions.claims_for(
                restricted,
                message.get("properties"),
                at,
                identity.identities,
                profile_id,
            )
        session = None
        if source.session_timeout is not None:
            session = SessionOp(
                at=incoming.received,
                timeout=source.session_timeout,
                session_id=session_id,
            )
        return EventRecord(
            source_id=source.id,
            message_id=message["message_id"],
            type="track",
            name=name,
            user_id=message.get("user_id"),
            anonymous_id=message.get("anonymous_id"),
            timestamp=message["timestamp"],
            received_at=incoming.received_iso,
            endpoint=incoming.endpoint,
            payload=encode_event(message),
            claims=claims,
            identity=identity,
            session=session,
            warnings=bot_warnings + warnings + claim_warnings,
        )

    def _refused(
        self,
        rejected: RequestRejected,
        incoming: Incoming,
        payload: bytes | str,
        source: Source | None,
    ) -> Prepared:
        batch = Batch(
            rejections=self.pipeline.request_rejection(rejected, incoming, payload, source)
        )
        answer = responses.json_response(HTTPStatus.OK, _error(rejected.reason, rejected.message))
        return Prepared(batch, lambda _outcomes: answer, _UNAVAILABLE)


def normalise_event(message: Message, max_id_length: int) -> str:
    """Validate a Firstparty event in place and return its name.

    ``event`` (the seeds also say ``name``) is required; ``properties`` and ``context``
    must be objects; ``profile_id`` and ``session_id`` strings of 1 to
    :data:`MAX_OWN_ID_LENGTH` characters, ``message_id`` and the identities (``user_id``,
    ``anonymous_id``, ``email``) of 1 to ``max_id_length`` (the Segment-spec ids' limit:
    an email address may be 254). ``name`` is folded into ``event``; a ``message_id`` is
    generated when missing.
    """
    name = message.get("event")
    if name is None:
        name = message.pop("name", None)
    if not isinstance(name, str) or not name.strip():
        raise ItemRejected("missing_event", "event (the event's name) is required")
    message["event"] = name
    for field in ("properties", "context"):
        value = message.get(field)
        if value is not None and not isinstance(value, dict):
            raise ItemRejected("invalid_field", f"{field} must be an object")
    for field, longest in (
        ("profile_id", MAX_OWN_ID_LENGTH),
        ("session_id", MAX_OWN_ID_LENGTH),
        ("message_id", max_id_length),
        ("user_id", max_id_length),
        ("anonymous_id", max_id_length),
        ("email", max_id_length),
    ):
        value = message.get(field)
        if value is None:
            continue
        if not isinstance(value, str) or not value or len(value) > longest:
            raise ItemRejected(
                "invalid_field", f"{field} must be a string of 1 to {longest} characters"
            )
    timestamp = message.get("timestamp")
    if timestamp is not None and (not isinstance(timestamp, str) or parse_iso(timestamp) is None):
        raise ItemRejected("invalid_timestamp", "timestamp must be an ISO-8601 date string")
    if not message.get("message_id"):
        message["message_id"] = new_id("EV")
    return name


def _result(outcome: Outcome) -> dict[str, object]:
    if outcome.stored:
        return {"success": True, "profile_id": outcome.profile_id, "session_id": outcome.session_id}
    if outcome.reason == "duplicate_message_id":
        # A retry of an event already stored: the client must not send it again.
        return {"success": True, "duplicate": True}
    if outcome.reason in _RESTRICTIONS:
        return _discarded(outcome.reason)
    return _error(outcome.reason or "rejected", f"not stored: {outcome.reason}")


# Claims that discard an event: answered as a success, so the client does not retry.
_RESTRICTIONS = frozenset({DUPLICATE_ORDER, EMAIL_OPEN_THROTTLED})


def _discarded(reason: str) -> dict[str, object]:
    return {"success": True, "discarded": reason}


def _error(code: str, message: str) -> dict[str, object]:
    return {"success": False, "code": code, "message": message}


def _event_key(item: object, header_key: str | None, shared_key: object) -> object:
    """The key an event of a bulk body is authenticated with: a Basic credential speaks
    for every event, else the event's own ``write_key``, else the body's shared one."""
    if header_key is not None:
        return header_key
    own = item.get("write_key") if isinstance(item, dict) else None
    return own or shared_key
