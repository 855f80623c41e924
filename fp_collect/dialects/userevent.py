"""The user-event API (seed 003): ``POST /v1/event`` with a ``user`` and an ``event``.

::

    {"user": {"email": "ann@example.com"}, "event": {"update": {"firstname": "Ann"}}}

``user`` names someone already known (by ``email``, or ``_id``: a profile id, a user
id or an anonymous id); the event is refused, and recorded, when nobody matches.
``event`` holds one key, the event's type, whose value holds its attributes:

* ``update`` sets attributes (traits) on the user's profile;
* ``login`` sets attributes too and identifies: an ``email`` it carries joins the
  user's profile, and when that email already belongs to another profile the two
  become one (the oldest survives), as identify does;
* ``confirmation`` is a purchase, stored as the Segment spec's ``Order Completed``:
  a second one with the same ``orderId`` is discarded;
* ``email_open`` is stored as ``Email Opened``, throttled per user (and email or
  campaign id) to one in the source's window;
* ``generic`` carries its own name in ``event_name``.

Answers keep the seed's shapes: ``{"results": {"message": "Event created", ...}}`` and
``{"errors": [{"message", "description"}]}`` (plus a machine-readable ``code``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fp_collect import responses
from fp_collect.config import Source
from fp_collect.decoding import encode_event
from fp_collect.dialects import Route
from fp_collect.errors import Discarded, ItemRejected, RequestRejected
from fp_collect.http import Request, Response
from fp_collect.pipeline import Incoming, Message, Pipeline, Prepared, with_details
from fp_collect.restrictions import CONFIRMATION, EMAIL_OPEN
from fp_collect.store.base import Batch, EventRecord, Identity, IdentityOp, Outcome, SessionOp
from fp_collect.store.identity import email_identity
from fp_collect.timestamps import parse_iso

PATH = "/v1/event"
# Each type and the track name it is stored under (None: an identify, it sets traits).
EVENT_TYPES: dict[str, str | None] = {
    "update": None,
    "login": None,
    "generic": "",  # named by its own event_name
    CONFIRMATION: "Order Completed",
    EMAIL_OPEN: "Email Opened",
}
# Profile ids as the store draws them; an _id of any other shape may be a user or
# anonymous id too.
_PROFILE_ID = re.compile(r"PR[0-9A-F]{30}")

# reason -> (the error's title, its description when the reason alone says it all)
_ERRORS: dict[str, tuple[str, str | None]] = {
    "missing_event": (
        "Missing event information",
        "Please send event information along with user",
    ),
    "missing_user": (
        "Missing user information",
        "Please send user information (email or _id) along with event",
    ),
    "unknown_user": (
        "User not found",
        "The user must exist beforehand: identify them first (an identify, a login, "
        "or a Firstparty event)",
    ),
    "unknown_event_type": ("Unknown event type", None),
    "invalid_event": ("Invalid event information", None),
    "invalid_user": ("Invalid user information", None),
    "invalid_json": ("Invalid JSON", None),
    "invalid_body": ("Invalid JSON", None),
    "payload_too_large": ("Request too large", None),
    "invalid_write_key": ("Invalid write key", None),
    "origin_not_allowed": ("Origin not allowed", None),
    "event_name_not_allowed": ("Event name not allowed", None),
    "store_unavailable": ("Service unavailable", "The event store is unavailable, retry later"),
}


def routes(pipeline: Pipeline) -> dict[str, Route]:
    api = UserEventAPI(pipeline)
    return {PATH: Route("event", frozenset({"POST"}), pipeline.limits.max_call_bytes, api.create)}


def error_body(reason: str, message: str) -> dict[str, object]:
    """The seed's error shape, with a stable ``code`` for programs."""
    title, description = _ERRORS.get(reason, ("Invalid request", None))
    return {"errors": [{"message": title, "description": description or message, "code": reason}]}


_UNAVAILABLE = responses.json_response(
    HTTPStatus.SERVICE_UNAVAILABLE,
    error_body("store_unavailable", ""),
    [("retry-after", "5")],
)


class UserEventAPI:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.limits = pipeline.limits

    def create(self, request: Request) -> Prepared:
        incoming = self.pipeline.incoming(request)
        payload: bytes | str = request.body
        source: Source | None = None
        body: Message = {}
        identifier = "email"
        try:
            payload = self.pipeline.read_body(request, self.limits.max_call_bytes)
            body = self.pipeline.parse_object(payload)
            key = self.pipeline.request_credential(request)
            if key is None:
                key = body.get("writeKey", body.get("write_key"))
            source = self.pipeline.authenticate(key)
            self.pipeline.check_origin(source, incoming)
            user, identifier = _user(body.get("user"), self.limits.max_message_id_length)
            event = self._event(body, user, source, incoming)
        except RequestRejected as rejected:
            return self._refused(rejected, incoming, payload, source)
        except ItemRejected as rejected:
            return self._refused(rejected.as_request(), incoming, payload, source)
        except Discarded as discarded:
            record = self.pipeline.item_rejection(
                discarded, incoming, body, None, source, body.get("messageId")
            )
            answer = _created(identifier, {"discarded": discarded.reason})
            return Prepared(Batch(rejections=[record]), lambda _outcomes: answer, _UNAVAILABLE)

        def respond(outcomes: Sequence[Outcome]) -> Response:
            outcome = outcomes[0]
            if outcome.stored:
                return _created(identifier, {"profile_id": outcome.profile_id})
            if outcome.reason == "unknown_user":
                message = "nobody with this " + identifier
                return responses.json_response(
                    HTTPStatus.BAD_REQUEST, error_body("unknown_user", message)
                )
            if outcome.reason == "duplicate_message_id":
                # A retry of an event already stored: the client must not send it again.
                return _created(identifier, {"duplicate": True})
            # A restriction's claim discarded it: answered like an accepted event.
            return _created(identifier, {"discarded": outcome.reason})

        return Prepared(Batch(events=[event]), respond, _UNAVAILABLE)

    def _event(
        self, body: Message, user: dict[str, str], source: Source, incoming: Incoming
    ) -> EventRecord:
        kind, attributes = _event(body.get("event"))
        longest = self.limits.max_message_id_length
        message_id = body.get("messageId", body.get("message_id"))
        if message_id is None:
            message_id = str(uuid.uuid4())
        elif not isinstance(message_id, str) or not 0 < len(message_id) <= longest:
            raise ItemRejected(
                "invalid_event", f"messageId must be a string of 1 to {longest} characters"
            )
        timestamp = body.get("timestamp")
        event_time = parse_iso(timestamp) if isinstance(timestamp, str) else None
        if timestamp is not None and event_time is None:
            raise ItemRejected("invalid_event", "timestamp must be an ISO-8601 date string")
        context = body.get("context")
        if context is not None and not isinstance(context, dict):
            raise ItemRejected("invalid_event", "context must be an object")

        track_name = EVENT_TYPES[kind]
        message: Message = {
            "type": "identify" if track_name is None else "track",
            "eventType": kind,
            "user": user,
            "messageId": message_id,
            "context": context or {},
        }
        if timestamp is not None:
            message["timestamp"] = timestamp
        if track_name is None:
            message["traits"] = attributes
        else:
            message["event"] = track_name or attributes["event_name"]
            message["properties"] = attributes

        bot_warnings = self.pipeline.check_bot(source, incoming)
        at = self.pipeline.enrich(message, incoming)
        message, warnings = self.pipeline.apply_rules(message, source)
        identity = _identity_op(kind, user, message, source, incoming.received)
        # A confirmation is one whatever its name; a generic event named like one (or
        # renamed by a rule) is restricted by its name, as in the other APIs.
        restricted = kind if kind in (CONFIRMATION, EMAIL_OPEN) else None
        if restricted is None and message["type"] == "track":
            restricted = source.restrictions.kind_of(message.get("event"))
        claims, claim_warnings = source.restrictions.claims_for(
            restricted,
            message.get("properties"),
            at,
            identity.lookups,
            identity.profile_id,
        )
        session = None
        if source.session_timeout is not None:
            session = SessionOp(at=incoming.received, timeout=source.session_timeout)
        name = message.get("event")
        user_id = user.get("_id")
        return EventRecord(
            source_id=source.id,
            message_id=message["messageId"],
            type=message["type"],
            name=name if isinstance(name, str) else None,
            user_id=user_id if identity.profile_id is None else None,
            anonymous_id=None,
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
        status = rejected.status
        extra = [("retry-after", "5")] if status == HTTPStatus.SERVICE_UNAVAILABLE else None
        if rejected.reason == "invalid_write_key":
            # A server API: a missing or wrong key is an authentication failure, 401.
            status = HTTPStatus.UNAUTHORIZED
            extra = [("www-authenticate", 'Basic realm="fp-collect"')]
        body = error_body(rejected.reason, with_details(rejected.message, rejected.details))
        answer = responses.json_response(status, body, extra)
        return Prepared(batch, lambda _outcomes: answer, _UNAVAILABLE)


def _user(value: object, longest: int) -> tuple[dict[str, str], str]:
    """The validated ``user`` object and the identifier it names the user by (each id of
    1 to ``longest`` characters, the Segment-spec ids' limit)."""
    if value is None or value == {}:
        raise ItemRejected("missing_user", "user is required")
    if not isinstance(value, dict):
        raise ItemRejected("invalid_user", "user must be an object with email or _id")
    user: dict[str, str] = {}
    for field in ("email", "_id"):
        item = value.get(field)
        if item is None:
            continue
        if not isinstance(item, str) or not 0 < len(item) <= longest:
            raise ItemRejected(
                "invalid_user", f"user.{field} must be a string of 1 to {longest} characters"
            )
        if field == "email" and email_identity(item) is None:
            raise ItemRejected("invalid_user", "user.email must be an email address")
        user[field] = item
    if not user:
        raise ItemRejected("missing_user", "user must name the user by email or _id")
    return user, "email" if "email" in user else "_id"


def _event(value: object) -> tuple[str, dict[str, Any]]:
    """The event's type and its attributes, validated."""
    if value is None or value == {}:
        raise ItemRejected("missing_event", "event is required")
    if not isinstance(value, dict):
        raise ItemRejected("invalid_event", "event must be an object holding one event type")
    if len(value) != 1:
        raise ItemRejected("invalid_event", "event must hold exactly one event type")
    ((kind, attributes),) = value.items()
    if kind not in EVENT_TYPES:
        raise ItemRejected(
            "unknown_event_type",
            f"unknown event type {str(kind)[:50]!r}; use one of {', '.join(EVENT_TYPES)}",
        )
    if attributes is None:
        attributes = {}
    if not isinstance(attributes, dict):
        raise ItemRejected("invalid_event", f"the {kind} event's attributes must be an object")
    if kind == "generic":
        nested = attributes.get("generic")
        if len(attributes) == 1 and isinstance(nested, dict):
            # The seed's own example nests the attributes once more.
            attributes = nested
        name = attributes.get("event_name")
        if not isinstance(name, str) or not name.strip():
            raise ItemRejected("invalid_event", "a generic event needs an event_name")
    return kind, attributes


def _identity_op(
    kind: str, user: dict[str, str], message: Message, source: Source, at: float
) -> IdentityOp:
    """Find the user (never create one); update and login set traits, login identifies."""
    lookups: list[Identity] = []
    profile_id = None
    email = email_identity(user.get("email"))
    if email is not None:
        lookups.append(email)
    user_id = user.get("_id")
    if user_id is not None:
        # A profile id when a profile has it: the store's own ids, or one a client gave
        # to the Firstparty API. Only an id of another shape may also be a userId or an
        # anonymousId, looked up when no profile has it.
        profile_id = user_id
        if not _PROFILE_ID.fullmatch(user_id):
            lookups += [Identity("user_id", user_id), Identity("anonymous_id", user_id)]
    traits = message.get("traits") if kind in ("update", "login") else None
    identities: tuple[Identity, ...] = ()
    if kind == "login" and isinstance(traits, dict):
        login_email = email_identity(traits.get("email"))
        if login_email is not None and login_email not in lookups:
            identities = (login_email,)
    return IdentityOp(
        scope=source.workspace,
        at=at,
        identities=identities,
        lookups=tuple(lookups),
        profile_id=profile_id,
        create=False,
        merge=kind == "login",
        traits=traits if isinstance(traits, dict) and traits else None,
    )


def _created(identifier: str, extra: dict[str, object]) -> Response:
    results: dict[str, object] = {
        "message": "Event created",
        identifier: "Event was created for the specified user",
        **extra,
    }
    return responses.json_response(HTTPStatus.OK, {"results": results})
