"""The Segment-spec HTTP Tracking API (seed 004).

``/v1/{identify,track,page,screen,group,alias}`` and their one-letter forms, the
batch endpoints (``/v1/batch``, ``/v1/import``, analytics.js's ``/v1/b``), the GET
tracking pixel and the webhook. Answers follow the seed: ``{"success": true}``,
``{"Error","Message","Details"}`` for a refused call and
``{"Success": false, "Errors": [...]}`` for batches.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

from fp_collect import responses
from fp_collect.auth import invalid_write_key
from fp_collect.config import Source
from fp_collect.decoding import dumps_lenient, encode_event, oversize_candidates, too_large
from fp_collect.dialects import Route
from fp_collect.errors import Discarded, ItemRejected, RequestRejected
from fp_collect.http import Request, Response
from fp_collect.pipeline import (
    Incoming,
    Message,
    Pipeline,
    Prepared,
    require_object,
    with_details,
)
from fp_collect.store.base import (
    Batch,
    Claim,
    EventRecord,
    Identity,
    IdentityOp,
    Outcome,
)
from fp_collect.store.identity import email_identity
from fp_collect.timestamps import parse_iso

MESSAGE_TYPES = ("identify", "track", "page", "screen", "group", "alias")
_VALID_TYPES = frozenset(MESSAGE_TYPES)
PIXEL_TYPES = ("track", "page", "screen", "identify", "group", "alias")
_STRING_FIELDS = (
    "userId",
    "anonymousId",
    "messageId",
    "event",
    "name",
    "category",
    "groupId",
    "previousId",
)
_OBJECT_FIELDS = ("context", "integrations", "properties", "traits")
_ID_FIELDS = ("messageId", "userId", "anonymousId", "groupId", "previousId")
_TIME_FIELDS = ("timestamp", "sentAt")
_STORE_UNAVAILABLE = RequestRejected(
    HTTPStatus.SERVICE_UNAVAILABLE,
    "store_unavailable",
    "The event store is unavailable, retry later",
)
_UNAVAILABLE_PIXEL = responses.pixel(HTTPStatus.SERVICE_UNAVAILABLE, [("retry-after", "5")])


def routes(pipeline: Pipeline) -> dict[str, Route]:
    """Every Segment-spec path (relative to the mount prefix) and its route."""
    api = SegmentAPI(pipeline)
    limits = pipeline.limits
    post = frozenset({"POST"})
    table: dict[str, Route] = {}
    for message_type in MESSAGE_TYPES:
        route = Route(message_type, post, limits.max_call_bytes, api.single_handler(message_type))
        table[f"/v1/{message_type}"] = route
        table[f"/v1/{message_type[0]}"] = route
    batch = Route("batch", post, limits.max_batch_bytes, api.batch)
    for path in ("/v1/batch", "/v1/import", "/v1/b"):
        table[path] = batch
    webhook = Route("webhook", post, limits.max_batch_bytes, api.webhook)
    table["/v1/webhook"] = table["/v1/w"] = webhook
    # analytics.js (analytics-next) posts its own telemetry to {apiHost}/m about every
    # 30 s: not events. Answered here, so that it neither reaches the host app (a 404 in
    # its logs per visitor and half-minute) nor fails in the browser; nothing is kept.
    table["/v1/m"] = Route("telemetry", post, limits.max_call_bytes, api.telemetry)
    for message_type in PIXEL_TYPES:
        # The payload travels in the query string; the body is never read.
        table[f"/v1/pixel/{message_type}"] = Route(
            f"pixel/{message_type}", frozenset({"GET"}), 0, api.pixel_handler(message_type)
        )
    return table


class SegmentAPI:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.limits = pipeline.limits

    # -- endpoints --------------------------------------------------------------------

    def single_handler(self, message_type: str) -> Any:
        def handle(request: Request) -> Prepared:
            incoming = self.pipeline.incoming(request)
            payload: bytes | str = request.body
            source: Source | None = None
            try:
                payload = self.pipeline.read_body(request, self.limits.max_call_bytes)
                message = self.pipeline.parse_object(payload)
                source = self._source(request, message)
                self.pipeline.check_origin(source, incoming)
                event = self._event(message, message_type, source, incoming)
            except RequestRejected as rejected:
                return self._refused(rejected, incoming, payload, source)
            except ItemRejected as rejected:
                return self._refused(rejected.as_request(), incoming, payload, source)
            except Discarded as discarded:
                return self._discarded(discarded, incoming, message, source)
            return _accepted(Batch(events=[event]))

        return handle

    def batch(self, request: Request) -> Prepared:
        incoming = self.pipeline.incoming(request)
        payload: bytes | str = request.body
        try:
            payload = self.pipeline.read_body(request, self.limits.max_batch_bytes)
            parsed, unstorable = self.pipeline.parse_batch(payload, "batch")
            body = require_object(parsed)
        except RequestRejected as rejected:
            return self._refused(rejected, incoming, payload, None, batch_shape=True)
        credential = self.pipeline.request_credential(request)
        return self._batch(body, payload, incoming, credential, unstorable)

    def webhook(self, request: Request) -> Prepared:
        """Analytics.js-formatted data from another system: one message or a batch.
        ``?writeKey=`` overrides whatever key the payload carries."""
        # An empty ?writeKey= is no key at all, not a wrong one.
        query_key = _query_value(request.query, "writeKey") or None
        if query_key is None:
            query_key = self.pipeline.request_credential(request)
        incoming = self.pipeline.incoming(request)
        payload: bytes | str = request.body
        source: Source | None = None
        try:
            payload = self.pipeline.read_body(request, self.limits.max_batch_bytes)
            parsed, unstorable = self.pipeline.parse_batch(payload, "batch")
            body = require_object(parsed)
            if "batch" in body:
                return self._batch(body, payload, incoming, query_key, unstorable)
            if len(payload) > self.limits.max_call_bytes:
                raise too_large(self.limits.max_call_bytes)
            source = self.pipeline.authenticate(query_key or body.get("writeKey"))
            self.pipeline.check_origin(source, incoming)
            event = self._event(body, None, source, incoming)
        except RequestRejected as rejected:
            return self._refused(rejected, incoming, payload, source)
        except ItemRejected as rejected:
            return self._refused(rejected.as_request(), incoming, payload, source)
        except Discarded as discarded:
            return self._discarded(discarded, incoming, body, source)
        return _accepted(Batch(events=[event]))

    def telemetry(self, request: Request) -> Prepared:
        """analytics.js's own metrics: answered as a success and not stored."""
        return _accepted(Batch())

    def pixel_handler(self, message_type: str) -> Any:
        def handle(request: Request) -> Prepared:
            """Always a 200 GIF: the pixel's caller (an <img>, a mail client) cannot act
            on an error, so what was wrong is recorded instead of shown."""
            incoming = self.pipeline.incoming(request)
            data = _query_value(request.query, "data") or ""
            payload: bytes | str = data
            source: Source | None = None
            try:
                payload = _b64decode(data)
                if len(payload) > self.limits.max_call_bytes:
                    raise too_large(self.limits.max_call_bytes)
                message = self.pipeline.parse_object(payload)
                source = self.pipeline.authenticate(
                    _query_value(request.query, "writeKey") or message.get("writeKey")
                )
                self.pipeline.check_origin(source, incoming)
                event = self._event(message, message_type, source, incoming)
            except (RequestRejected, ItemRejected) as rejected:
                refused = rejected.as_request() if isinstance(rejected, ItemRejected) else rejected
                batch = Batch(
                    rejections=self.pipeline.request_rejection(refused, incoming, payload, source)
                )
                return Prepared(batch, _PIXEL, _UNAVAILABLE_PIXEL)
            except Discarded as discarded:
                record = self.pipeline.item_rejection(
                    discarded, incoming, message, None, source, message.get("messageId")
                )
                return Prepared(Batch(rejections=[record]), _PIXEL, _UNAVAILABLE_PIXEL)
            return Prepared(Batch(events=[event]), _PIXEL, _UNAVAILABLE_PIXEL)

        return handle

    # -- shared steps -----------------------------------------------------------------

    def _batch(
        self,
        body: Message,
        payload: bytes | str,
        incoming: Incoming,
        request_key: str | None,
        unstorable: dict[int, str],
    ) -> Prepared:
        try:
            items = body.get("batch")
            if not isinstance(items, list):
                raise RequestRejected(
                    HTTPStatus.BAD_REQUEST, "invalid_batch", "batch must be an array of events"
                )
            if not items:
                raise RequestRejected(HTTPStatus.BAD_REQUEST, "empty_batch", "batch is empty")
            self.pipeline.check_batch_size(len(items))
            defaults = BatchDefaults.from_body(body)
            if request_key is None and isinstance(body.get("writeKey"), str):
                request_key = body["writeKey"]
            request_source = self.pipeline.keys.resolve(request_key)
            # Without a request key, each item's own, resolved once here so that every
            # refusal below is its source's. A batch with no valid key at all is refused
            # once, not item by item.
            item_sources = None
            if request_key is None:
                item_sources = [
                    self.pipeline.keys.resolve(item.get("writeKey"))
                    if isinstance(item, dict)
                    else None
                    for item in items
                ]
            if request_source is None and not (item_sources and any(item_sources)):
                raise invalid_write_key()
            if request_source is not None:
                # As on a single call: the request's own source refuses it whole (403).
                self.pipeline.check_origin(request_source, incoming)
        except RequestRejected as rejected:
            key = request_key if request_key is not None else body.get("writeKey")
            source = self.pipeline.keys.resolve(key)
            return self._refused(rejected, incoming, payload, source, batch_shape=True)

        # The per-event limit holds for the event as stored, the batch's defaults merged
        # in: each item may take what they leave. Only when the whole body could exceed
        # that are items measured, and then only those that a measure of their group does
        # not vouch for.
        room = self.limits.max_event_bytes - defaults.size
        to_measure = (
            oversize_candidates(items, len(payload), room) if len(payload) > room else frozenset()
        )
        batch = Batch()
        errors: list[dict[str, object]] = []
        for index, item in enumerate(items):
            source = request_source if item_sources is None else item_sources[index]
            # As the client sent it: normalising the item generates one when it has none.
            raw_id = item.get("messageId") if isinstance(item, dict) else None
            try:
                if index in unstorable:
                    raise ItemRejected(
                        "invalid_json", f"the event cannot be stored as JSON: {unstorable[index]}"
                    )
                # Measured merged, as it would be stored; recorded as sent if refused.
                if index in to_measure:
                    measured = defaults.merged(item) if isinstance(item, dict) else item
                    if len(encode_event(measured).encode()) > self.limits.max_event_bytes:
                        merged = " with the batch's defaults merged in" if defaults.size else ""
                        raise ItemRejected(
                            "event_too_large",
                            f"event larger than {self.limits.max_event_bytes} bytes{merged}",
                        )
                if not isinstance(item, dict):
                    raise ItemRejected("invalid_event", "each batch item must be a JSON object")
                if source is None:
                    raise ItemRejected("invalid_write_key", "Invalid or missing writekey")
                if not source.allows_origin(incoming.origin):
                    raise ItemRejected("origin_not_allowed", "Origin not allowed for this source")
                message = defaults.merged(item)
                event = self._event(message, None, source, incoming, defaults.sent_at)
                event.index = index
                batch.events.append(event)
            except ItemRejected as rejected:
                record = self.pipeline.item_rejection(
                    rejected, incoming, item, index, source, raw_id
                )
                errors.append(_item_error(index, record.message_id, rejected))
                if self.pipeline.keeps(record):
                    batch.rejections.append(record)
            except Discarded as discarded:
                # Answered like the stored ones: the client must not send it again. Recorded
                # as it would have been stored, under the id it was read with (generated if
                # it had none), as a single call's.
                batch.rejections.append(
                    self.pipeline.item_rejection(
                        discarded, incoming, message, index, source, message.get("messageId")
                    )
                )
        if not errors:
            return _accepted(batch, _UNAVAILABLE_BATCH)
        partial = HTTPStatus.MULTI_STATUS
        if request_source is not None and request_source.partial_success_status == 200:
            partial = HTTPStatus.OK
        status, code = (partial, "partial_success") if batch.events else _all_refused(errors)
        answer = responses.json_response(
            status,
            {
                "Success": False,
                "Errors": errors,
                "code": code,
                "message": f"{len(errors)} of {len(items)} events rejected",
            },
        )
        return Prepared(batch, _always(answer), _UNAVAILABLE_BATCH)

    def _source(self, request: Request, message: Message) -> Source:
        key = self.pipeline.request_credential(request)
        return self.pipeline.authenticate(key if key is not None else message.get("writeKey"))

    def _event(
        self,
        message: Message,
        forced_type: str | None,
        source: Source,
        incoming: Incoming,
        batch_sent_at: object = None,
    ) -> EventRecord:
        message_type = normalise_message(message, forced_type, self.limits.max_message_id_length)
        # The key did its job in authentication; it is not part of the event.
        message.pop("writeKey", None)
        bot_warnings = self.pipeline.check_bot(source, incoming)
        at = self.pipeline.enrich(message, incoming, batch_sent_at)
        message, warnings = self.pipeline.apply_rules(message, source)
        name = message.get("event") if message_type == "track" else message.get("name")
        identity = identity_op(message, message_type, source, incoming.received)
        claims: tuple[Claim, ...] = ()
        restricted = source.restrictions.kind_of(name) if message_type == "track" else None
        if restricted is not None:
            claims, claim_warnings = source.restrictions.claims_for(
                restricted,
                message.get("properties"),
                at,
                identity.identities,
            )
            warnings += claim_warnings
        return EventRecord(
            source_id=source.id,
            message_id=message["messageId"],
            type=message_type,
            name=name if isinstance(name, str) else None,
            user_id=message.get("userId") or None,
            anonymous_id=message.get("anonymousId") or None,
            timestamp=message["timestamp"],
            received_at=incoming.received_iso,
            endpoint=incoming.endpoint,
            payload=encode_event(message),
            claims=claims,
            identity=identity,
            warnings=bot_warnings + warnings,
        )

    def _discarded(
        self, discarded: Discarded, incoming: Incoming, message: Message, source: Source | None
    ) -> Prepared:
        """A single call a restriction removed: recorded, and answered as a success."""
        record = self.pipeline.item_rejection(
            discarded, incoming, message, None, source, message.get("messageId")
        )
        return _accepted(Batch(rejections=[record]))

    def _refused(
        self,
        rejected: RequestRejected,
        incoming: Incoming,
        payload: bytes | str,
        source: Source | None,
        *,
        batch_shape: bool = False,
    ) -> Prepared:
        batch = Batch(
            rejections=self.pipeline.request_rejection(rejected, incoming, payload, source)
        )
        unavailable = _UNAVAILABLE_BATCH if batch_shape else _UNAVAILABLE
        return Prepared(batch, _always(error_response(rejected, batch_shape)), unavailable)


class BatchDefaults:
    """Batch-level fields that apply to every item; the item's own fields win.

    The seed lets a batch inject ``context`` and timestamps from the top level:
    ``context`` and ``integrations`` are merged into each item, ``timestamp`` is the
    time of every item that has none, and ``sentAt`` corrects the clock skew of every
    item that has no ``sentAt`` of its own.
    """

    __slots__ = ("_shared", "context", "integrations", "sent_at", "size", "timestamp")

    def __init__(
        self,
        context: Message | None,
        integrations: Message | None,
        sent_at: object,
        timestamp: object = None,
    ) -> None:
        self.context = context
        self.integrations = integrations
        self.sent_at = sent_at
        self.timestamp = timestamp
        # What apply() merges, worked out once per batch rather than once per item.
        self._shared = tuple(
            (name, shared)
            for name, shared in (("context", context), ("integrations", integrations))
            if shared is not None
        )
        # The most bytes apply() can add to an item's encoding: each shared object with
        # its key, the timestamp with its. An item's own keys win, so it may add less.
        self.size = sum(len(name) + 4 + _encoded_size(shared) for name, shared in self._shared)
        if timestamp is not None:
            self.size += len("timestamp") + 4 + _encoded_size(timestamp)

    @classmethod
    def from_body(cls, body: Message) -> BatchDefaults:
        context, integrations = body.get("context"), body.get("integrations")
        for name, value in (("context", context), ("integrations", integrations)):
            if value is not None and not isinstance(value, dict):
                raise RequestRejected(
                    HTTPStatus.BAD_REQUEST, "invalid_batch", f"batch-level {name} must be an object"
                )
        # Unlike sentAt, it becomes the events' own time: a bad one is injected as it is,
        # and refuses (alone) each event that takes it, as its own bad timestamp would.
        timestamp = body.get("timestamp")
        sent_at = body.get("sentAt")
        # A malformed batch sentAt only disables skew correction; it costs no event.
        if not isinstance(sent_at, str) or parse_iso(sent_at) is None:
            sent_at = None
        return cls(context or None, integrations or None, sent_at, timestamp)

    def merged(self, item: Message) -> Message:
        """``item`` as :meth:`apply` would make it, leaving ``item`` as it is (a copy
        when there is anything to merge): what is refused is then recorded as sent."""
        if not self.size:
            return item
        copy = dict(item)
        self.apply(copy)  # replaces the copy's context and integrations, never mutates them
        return copy

    def apply(self, item: Message) -> None:
        for name, shared in self._shared:
            own = item.get(name)
            if own is None:
                item[name] = dict(shared)
            elif isinstance(own, dict):
                item[name] = {**shared, **own}
        if self.timestamp is not None and item.get("timestamp") is None:
            item["timestamp"] = self.timestamp


def _encoded_size(value: object) -> int:
    """Bytes of ``value`` as the store encodes it (as the JSON it came in, if it cannot be
    encoded: each event that takes it is refused for that anyway)."""
    try:
        return len(encode_event(value).encode())
    except ItemRejected:
        return len(dumps_lenient(value).encode())


def identity_op(message: Message, message_type: str, source: Source, at: float) -> IdentityOp:
    """The profile a Segment message belongs to, in the one identity graph.

    ``userId``, ``anonymousId`` and the ``email`` trait are identities. identify merges
    traits into the profile and, like alias, joins the profiles its identities name; an
    alias's ``previousId`` may be either a userId or an anonymousId, so it is looked up
    as both but attached as neither.
    """
    identities: list[Identity] = []
    user_id, anonymous_id = message.get("userId"), message.get("anonymousId")
    if user_id:
        identities.append(Identity("user_id", user_id))
    if anonymous_id:
        identities.append(Identity("anonymous_id", anonymous_id))
    context = message.get("context")  # a rule may have removed it
    context_traits = context.get("traits") if isinstance(context, dict) else None
    traits = None
    if message_type == "identify":
        # rudder-sdk-python sends identify traits in context.traits only.
        traits = message.get("traits") or context_traits
        traits = traits if isinstance(traits, dict) and traits else None
    email = _email(traits) or _email(context_traits)
    if email is not None:
        identities.append(email)
    lookups: tuple[Identity, ...] = ()
    if message_type == "alias":
        previous = message["previousId"]
        lookups = (Identity("user_id", previous), Identity("anonymous_id", previous))
    return IdentityOp(
        scope=source.workspace,
        at=at,
        identities=tuple(identities),
        lookups=lookups,
        merge=message_type in ("identify", "alias"),
        traits=traits,
    )


def _email(traits: object) -> Identity | None:
    return email_identity(traits.get("email")) if isinstance(traits, dict) else None


def normalise_message(message: Message, forced_type: str | None, max_message_id: int) -> str:
    """Validate ``message`` per the seed's field tables and bring it to normal form
    in place: ``type`` set, a ``messageId`` generated when missing. Unknown fields are
    kept. Returns the type; raises :class:`ItemRejected` naming the first problem.

    Normalising a normalised message changes nothing.
    """
    message_type = forced_type or message.get("type")
    if not isinstance(message_type, str) or message_type not in _VALID_TYPES:
        raise ItemRejected(
            "invalid_type", "type must be one of identify, track, page, screen, group, alias"
        )
    for name in _STRING_FIELDS:
        value = message.get(name)
        if value is not None and not isinstance(value, str):
            raise ItemRejected("invalid_field", f"{name} must be a string")
    for name in _OBJECT_FIELDS:
        value = message.get(name)
        if value is not None and not isinstance(value, dict):
            raise ItemRejected("invalid_field", f"{name} must be an object")
    for name in _TIME_FIELDS:
        value = message.get(name)
        if value is not None and (not isinstance(value, str) or parse_iso(value) is None):
            raise ItemRejected("invalid_timestamp", f"{name} must be an ISO-8601 date string")
    if not (message.get("userId") or message.get("anonymousId")):
        raise ItemRejected("missing_user_id", "userId or anonymousId is required")
    if message_type == "track" and not message.get("event"):
        # The seed's field table names it eventName (its examples, and every client, event).
        alias = message.get("eventName")
        if not isinstance(alias, str) or not alias:
            raise ItemRejected("missing_event", "event is required for track")
        message["event"] = message.pop("eventName")
    elif message_type == "group" and not message.get("groupId"):
        raise ItemRejected("missing_group_id", "groupId is required for group")
    elif message_type == "alias" and not message.get("previousId"):
        raise ItemRejected("missing_previous_id", "previousId is required for alias")
    message_id = message.get("messageId")
    if not message_id:
        message["messageId"] = str(uuid.uuid4())
    # Ids are index keys in every store: unbounded ones would fail a whole batch there.
    for name in _ID_FIELDS:
        value = message.get(name)
        if value is not None and len(value) > max_message_id:
            raise ItemRejected("invalid_field", f"{name} longer than {max_message_id} characters")
    message["type"] = message_type
    return message_type


def error_response(rejected: RequestRejected, batch_shape: bool = False) -> Response:
    """A refused request's answer: on the batch endpoints in the seed's batch shape
    (``{"Success": false, "Errors": [...]}``), a bad write key included."""
    status = rejected.status
    extra = [("retry-after", "5")] if status == HTTPStatus.SERVICE_UNAVAILABLE else None
    if batch_shape:
        error = responses.error_object(status, rejected.message, rejected.details)
        if status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
            # The seed's own words for an over-size batch.
            error = {
                "Error": "Bad Request",
                "Message": "Error reading request body",
                "Details": "HTTP request too large",
            }
        return responses.json_response(
            status,
            {
                "Success": False,
                "Errors": [error],
                "code": rejected.reason,
                "message": with_details(rejected.message, rejected.details),
            },
            extra,
        )
    body = responses.single_error(status, rejected.reason, rejected.message, rejected.details)
    return responses.json_response(status, body, extra)


def _item_error(index: int, message_id: str | None, rejected: ItemRejected) -> dict[str, object]:
    return {
        "Error": "Bad Request",
        "Message": rejected.message,
        "Details": rejected.reason,
        "index": index,
        "messageId": message_id,
        "code": rejected.reason,
    }


def _all_refused(errors: list[dict[str, object]]) -> tuple[HTTPStatus, str]:
    """The status and code of a batch none of whose events was stored: 400, unless every
    refusal was an over-size event, which the seed answers 413 (clients retry neither)."""
    if all(error["code"] == "event_too_large" for error in errors):
        return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "event_too_large"
    return HTTPStatus.BAD_REQUEST, "invalid_batch"


def _accepted(batch: Batch, unavailable: Response | None = None) -> Prepared:
    """Answered ``{"success": true}`` once stored; ``unavailable`` (the single-call
    shape by default) when the store cannot commit in time."""
    return Prepared(batch, _SUCCESS, unavailable or _UNAVAILABLE)


def _always(response: Response) -> Any:
    """Segment answers do not depend on outcomes: a duplicate is answered like a success
    so clients stop retrying it."""

    def respond(_outcomes: Sequence[Outcome]) -> Response:
        return response

    return respond


def _query_value(query: str, name: str) -> str | None:
    values = parse_qs(query, keep_blank_values=True).get(name)
    return values[-1] if values else None


def _b64decode(data: str) -> bytes:
    """Standard or URL-safe base64, padding optional (browsers and mailers vary)."""
    cleaned = data.strip().replace("-", "+").replace("_", "/").replace(" ", "+")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestRejected(
            HTTPStatus.BAD_REQUEST, "invalid_pixel_data", "data must be base64-encoded JSON"
        ) from exc


# The answers that do not depend on the request, built once.
_SUCCESS = _always(responses.success())
_UNAVAILABLE = error_response(_STORE_UNAVAILABLE)
_UNAVAILABLE_BATCH = error_response(_STORE_UNAVAILABLE, batch_shape=True)
_PIXEL = _always(responses.pixel())
