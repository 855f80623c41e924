"""The shared stages of the core pipeline, used by every dialect.

route -> decode -> authenticate -> validate -> enrich -> restrict: dialects own
routing, validation and the shape of their answers; everything here is common.
Sans-I/O: a function of the request, the configuration and the clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import ujson

from fp_collect.auth import KeyRing, basic_username, invalid_write_key
from fp_collect.clientip import ClientAddress
from fp_collect.config import CollectorConfig, Source
from fp_collect.decoding import (
    check_content_type,
    decompress,
    dumps_lenient,
    parse_batch,
    parse_json,
    too_large,
)
from fp_collect.errors import Discarded, ItemRejected, RequestRejected
from fp_collect.event_names import EventNamePolicy
from fp_collect.http import Request, Response
from fp_collect.restrictions import BOT, crawler_pattern, is_browser_traffic
from fp_collect.store.base import Batch, Outcome, RejectionRecord
from fp_collect.timestamps import MAX_EPOCH, MIN_EPOCH, format_iso, parse_iso

Message = dict[str, Any]

# A refusal is recorded to be read, not replayed: its payload is cut to this many
# characters, so that no client (a refused one needs no key) can make one record, and
# with it every page the read API or the CLI loads, arbitrarily large. It keeps any
# single call whole and the beginning of a batch.
MAX_RECORDED_PAYLOAD = 32 * 1024


@dataclass(slots=True)
class Incoming:
    """Facts about one request that every event in it shares (not frozen only because a
    frozen dataclass costs a microsecond more per request)."""

    received: float
    received_iso: str
    endpoint: str
    ip: str | None
    user_agent: str | None
    origin: str | None
    # Sent by a browser (or a crawler posing as one): the bot restriction's scope.
    browser: bool
    # The Authorization header, read only to name the source of a refused request.
    authorization: str | None = None


@dataclass(slots=True)
class Prepared:
    """What the core decided for one request, before the store has spoken.

    ``respond`` turns the store's outcomes (one per ``batch.events`` entry) into the
    answer; ``unavailable`` is the answer when the store cannot commit in time.
    """

    batch: Batch
    respond: Callable[[Sequence[Outcome]], Response]
    unavailable: Response


def _key_in_body(payload: bytes | str) -> object:
    """The write key a refused body names, if it can be read at all: its own, else its
    first event's (a Segment batch, a Firstparty bulk body). Only on the refusal path."""
    try:
        body = ujson.loads(payload)
    except (ValueError, OverflowError):
        return None
    if isinstance(body, dict):
        key = body.get("writeKey") or body.get("write_key")
        if key:
            return key
        body = body.get("batch") or body.get("events")
    if isinstance(body, list) and body and isinstance(body[0], dict):
        return body[0].get("writeKey") or body[0].get("write_key")
    return None


def require_object(value: object) -> Message:
    """``value``, if it is a JSON object; else the body is refused (400 ``invalid_body``)."""
    if not isinstance(value, dict):
        raise RequestRejected(
            HTTPStatus.BAD_REQUEST, "invalid_body", "the body must be a JSON object"
        )
    return value


class Pipeline:
    """Configuration-derived helpers, built once; O(1) work per request beyond the body."""

    def __init__(self, config: CollectorConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.limits = config.limits
        self.clock = clock
        self.keys = KeyRing(config.sources)
        self._client_address = ClientAddress(config.proxy_networks())
        self._name_policies = {strict: EventNamePolicy(strict) for strict in (False, True)}

    def incoming(self, request: Request) -> Incoming:
        received = self.clock()
        headers = request.headers
        user_agent = headers.get("user-agent")
        origin = headers.get("origin")
        return Incoming(
            received=received,
            received_iso=format_iso(received),
            endpoint=request.path,
            ip=self._client_address.resolve(request.client, headers),
            user_agent=user_agent,
            origin=origin,
            browser=is_browser_traffic(origin, headers.get("referer"), user_agent),
            authorization=headers.get("authorization"),
        )

    # -- decode ---------------------------------------------------------------------

    def read_body(self, request: Request, limit: int) -> bytes:
        """The request body, decompressed and within ``limit`` bytes, or 413/415/400."""
        if request.body_too_large or len(request.body) > limit:
            raise too_large(limit)
        check_content_type(request.headers)
        return decompress(request.body, request.headers, limit)

    def parse(self, data: bytes | str) -> object:
        return parse_json(data, self.limits.max_depth)

    def parse_batch(self, data: bytes | str, items_key: str) -> tuple[object, dict[int, str]]:
        """:meth:`parse` for a batch: the body, and what each event that cannot be stored
        holds, by index (see :func:`~fp_collect.decoding.parse_batch`)."""
        return parse_batch(data, self.limits.max_depth, items_key)

    def parse_object(self, data: bytes | str) -> Message:
        """:meth:`parse`, refusing anything but a JSON object (400 ``invalid_body``)."""
        return require_object(self.parse(data))

    # -- authenticate -----------------------------------------------------------------

    def request_credential(self, request: Request) -> str | None:
        """The write key presented outside the body: HTTP Basic username."""
        return basic_username(request.headers.get("authorization"))

    def authenticate(self, key: object) -> Source:
        source = self.keys.resolve(key)
        if source is None:
            raise invalid_write_key()
        return source

    def check_origin(self, source: Source, incoming: Incoming) -> None:
        if not source.allows_origin(incoming.origin):
            raise RequestRejected(
                HTTPStatus.FORBIDDEN,
                "origin_not_allowed",
                "Origin not allowed for this source",
                str(incoming.origin)[:200],
            )

    # -- enrich -------------------------------------------------------------------------

    def enrich(self, message: Message, incoming: Incoming, batch_sent_at: object = None) -> float:
        """Add what the server knows: ``receivedAt``, a skew-corrected ``timestamp``
        (the client's value kept in ``originalTimestamp``), ``context.ip`` and
        ``context.userAgent`` when the client did not send them.

        Expects a validated message: ``timestamp``/``sentAt`` are ISO strings or absent.
        Returns the event's corrected time in epoch seconds.
        """
        message["receivedAt"] = incoming.received_iso
        timestamp = message.get("timestamp")
        event_time = parse_iso(timestamp) if isinstance(timestamp, str) else None
        if event_time is None:
            message["timestamp"] = incoming.received_iso
            event_time = incoming.received
        else:
            message["originalTimestamp"] = timestamp
            event_time = self._corrected(event_time, message.get("sentAt", batch_sent_at), incoming)
            message["timestamp"] = format_iso(event_time)
        context = message.get("context")
        if not isinstance(context, dict):
            context = message["context"] = {}
        if incoming.ip is not None and not context.get("ip"):
            context["ip"] = incoming.ip
        if incoming.user_agent is not None and not context.get("userAgent"):
            context["userAgent"] = incoming.user_agent
        return event_time

    def _corrected(self, event_time: float, sent_at: object, incoming: Incoming) -> float:
        """Shift the event by the client's clock error, measured as sentAt - receivedAt."""
        sent = parse_iso(sent_at) if isinstance(sent_at, str) else None
        corrected = event_time if sent is None else incoming.received - (sent - event_time)
        if corrected > incoming.received + self.config.max_future_seconds:
            # A clock far in the future would put the event ahead of everything else.
            return incoming.received
        if not MIN_EPOCH <= corrected <= MAX_EPOCH:
            return event_time
        return corrected

    # -- rules and restrictions ---------------------------------------------------------

    def apply_rules(self, message: Message, source: Source) -> tuple[Message, tuple[str, ...]]:
        """Run the source's rules, then the naming guidelines on the final name.

        Returns the event to keep and the warnings it is stored with (a rule that failed,
        a name that breaks the guidelines). A strict source refuses such a name instead.
        """
        warnings: tuple[str, ...] = ()
        # The tuple of rules, not the RuleSet: its __len__ would be a Python call per event.
        if source.rules.rules:
            result = source.rules.apply(message)
            message = result.event
            warnings = tuple(
                f"rule {error.rule_index} ({error.rule_name}): {error.message}"
                for error in result.errors
            )
        name = message.get("event")
        # Page and screen names ("Home") are not events: the guidelines are for track.
        if message.get("type", "track") == "track" and isinstance(name, str):
            verdict = self._name_policies[source.strict_event_names].evaluate(name)
            if verdict.reject:
                raise ItemRejected(
                    "event_name_not_allowed",
                    f"event name {name[:100]!r} breaks the naming guidelines: "
                    + " ".join(verdict.warnings),
                )
            if verdict.warnings:
                warnings += tuple(f"event name: {warning}" for warning in verdict.warnings)
        return message, warnings

    def check_bot(self, source: Source, incoming: Incoming) -> tuple[str, ...]:
        """Discard (or flag, as the source says) browser traffic from a crawler.

        Returns the warnings to store the event with; raises :class:`Discarded`.
        """
        policy = source.restrictions.bots
        if policy == "allow" or not incoming.browser or not incoming.user_agent:
            return ()
        pattern = crawler_pattern(incoming.user_agent)
        if pattern is None:
            return ()
        # Quoted as written in the list: repr() would double its regex backslashes.
        if policy == "drop":
            raise Discarded(BOT, f"browser traffic from a crawler (user agent matches '{pattern}')")
        return (f"bot: user agent matches crawler pattern '{pattern}'",)

    # -- record -----------------------------------------------------------------------

    def request_rejection(
        self,
        rejected: RequestRejected,
        incoming: Incoming,
        payload: bytes | str,
        source: Source | None,
    ) -> list[RejectionRecord]:
        """The record of a refused request (empty when configured not to keep it).

        Refused before its source was known (a value that cannot be stored, a batch too
        long, say), it is still that source's when a key it carries names one: its Basic
        credential, else its body's key (or its first event's). Only a request with no
        valid key is unauthenticated.
        """
        if source is None:
            source = self.keys.resolve(basic_username(incoming.authorization))
        if source is None:
            source = self.keys.resolve(_key_in_body(payload))
        if source is None and not self.config.record_unauthenticated:
            return []
        return [
            RejectionRecord(
                source_id=source.id if source else None,
                reason=rejected.reason,
                message=with_details(rejected.message, rejected.details),
                received_at=incoming.received_iso,
                endpoint=incoming.endpoint,
                payload=recorded(payload),
            )
        ]

    def keeps(self, record: RejectionRecord) -> bool:
        """Whether a refused event's record is kept: always when it came with a valid
        key, and without one only with ``record_unauthenticated``."""
        return record.source_id is not None or self.config.record_unauthenticated

    def check_batch_size(self, events: int) -> None:
        """Refuse a batch of more events than the limit (413), before any is read."""
        if events > self.limits.max_batch_events:
            raise RequestRejected(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "payload_too_large",
                "Request entity too large",
                f"at most {self.limits.max_batch_events} events per batch, got {events}",
            )

    def item_rejection(
        self,
        rejected: RequestRejected | ItemRejected | Discarded,
        incoming: Incoming,
        item: object,
        index: int | None,
        source: Source | None,
        message_id: object,
    ) -> RejectionRecord:
        """The record of one refused or discarded event (``index``: its place in a
        batch), kept with its JSON."""
        return RejectionRecord(
            source_id=source.id if source else None,
            reason=rejected.reason,
            message=rejected.message,
            received_at=incoming.received_iso,
            endpoint=incoming.endpoint,
            payload=recorded(dumps_lenient(item)),
            index=index,
            # as_text: a hostile id may hold a lone surrogate that no store accepts.
            message_id=as_text(message_id) if isinstance(message_id, str) else None,
        )


def recorded(payload: bytes | str) -> str:
    """``payload`` as :func:`as_text`, cut to :data:`MAX_RECORDED_PAYLOAD` characters
    with a note of how long it was."""
    if len(payload) <= MAX_RECORDED_PAYLOAD:
        text = as_text(payload)
        if len(text) <= MAX_RECORDED_PAYLOAD:
            return text
    # Only the beginning is decoded: an escaped invalid byte takes four characters.
    unit = "bytes" if isinstance(payload, bytes) else "characters"
    kept = as_text(payload[:MAX_RECORDED_PAYLOAD])[:MAX_RECORDED_PAYLOAD]
    return f"{kept}... [cut at {MAX_RECORDED_PAYLOAD} characters; it had {len(payload)} {unit}]"


def as_text(payload: bytes | str) -> str:
    """Raw bytes as text for storage, invalid UTF-8 kept visible as escapes."""
    if isinstance(payload, str):
        return payload.encode("utf-8", "backslashreplace").decode("utf-8")
    return payload.decode("utf-8", "backslashreplace")


def with_details(message: str, details: str) -> str:
    return f"{message}: {details}" if details else message
