"""Restrictions: which events are discarded though nothing is wrong with them (seed 003).

* **Bots.** Browser traffic whose User-Agent matches a crawler pattern from the
  maintained list of the ``crawler-user-agents`` package is dropped (the default),
  flagged, or allowed. Only browser traffic is checked: a server SDK or a mobile app
  (``okhttp``, ``analytics-python``) is never judged by its HTTP client's name, and a
  browser's User-Agent that a server relays in ``context.userAgent`` is not looked at.
* **Confirmations.** A second ``Order Completed`` with the same order id in the same
  source is discarded (a forever claim on the order id).
* **Email opens.** At most one ``Email Opened`` per user, and per email or campaign id
  when the event names one, in any window (20 minutes by default): an open claims its
  key until its time plus the window.

The *policy* is here, pure and clock-free: it turns an event into the claims it must
win. The store applies the claims atomically with the event write, which is what keeps
them exact across threads, processes and machines. A discarded event is answered like
an accepted one (a client must not retry it) and recorded with its reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from fp_collect.errors import (
    MAX_WINDOW_SECONDS,
    ConfigError,
    check_bool,
    check_seconds,
    config_tuple,
)
from fp_collect.store.base import Claim, Identity

# The reasons stored with what each restriction discards (the claims' kinds).
BOT = "bot"
DUPLICATE_ORDER = "duplicate_order_id"
EMAIL_OPEN_THROTTLED = "email_open_throttled"

BOT_POLICIES = ("drop", "flag", "allow")
# The restricted kinds of event, whatever a dialect calls them.
CONFIRMATION = "confirmation"
EMAIL_OPEN = "email_open"
# Property names that carry the ids, in the Segment spec's spelling and camelCase.
_ORDER_ID = ("order_id", "orderId")
_EMAIL_ID = ("email_id", "emailId")
_CAMPAIGN_ID = ("campaign_id", "campaignId")
# What an id may be; a tuple, since ``int | str | float`` would be built on every call.
_ID_TYPES = (int, str, float)
# Longer keys are stored as their SHA-256: a hostile id must not bloat the claims table.
_MAX_KEY_LENGTH = 128


@dataclass(frozen=True, slots=True)
class Restrictions:
    """A source's restriction settings.

    :param bots: ``"drop"`` (default) discards browser events from crawlers; ``"flag"``
        stores them with a ``bot`` warning (listable with ``flagged``); ``"allow"``
        turns the check off.
    :param confirmation_dedup: discard a second confirmation of one order id.
    :param email_open_window: seconds during which a user's email open discards the
        next ones (per email or campaign); None turns the throttle off.
    :param confirmation_events: track event names that are confirmations.
    :param email_open_events: track event names that are email opens.
    """

    bots: str = "drop"
    confirmation_dedup: bool = True
    email_open_window: float | None = 20 * 60.0
    confirmation_events: tuple[str, ...] = ("Order Completed",)
    email_open_events: tuple[str, ...] = ("Email Opened",)

    if TYPE_CHECKING:
        # Any iterable of names, or one name as a plain string: __post_init__ makes them
        # tuples, which is what the fields hold (see config.Source's constructor).
        def __init__(
            self,
            bots: str = "drop",
            confirmation_dedup: bool = True,
            email_open_window: float | None = 20 * 60.0,
            confirmation_events: str | Iterable[str] = ("Order Completed",),
            email_open_events: str | Iterable[str] = ("Email Opened",),
        ) -> None: ...

    def __post_init__(self) -> None:
        if self.bots not in BOT_POLICIES:
            raise ConfigError(f"Restrictions.bots must be one of {', '.join(BOT_POLICIES)}")
        check_bool(self.confirmation_dedup, "Restrictions.confirmation_dedup")
        if self.email_open_window is not None:
            check_seconds(
                self.email_open_window,
                "Restrictions.email_open_window",
                MAX_WINDOW_SECONDS,
                none=True,
            )
        for name in ("confirmation_events", "email_open_events"):
            value = getattr(self, name)
            value = config_tuple(value, f"Restrictions.{name}", one_string=True)
            if not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"Restrictions.{name} must be event names")
            object.__setattr__(self, name, value)

    def kind_of(self, name: object) -> str | None:
        """``"confirmation"``, ``"email_open"`` or None for a track event's name."""
        if not isinstance(name, str):
            return None
        if name in self.confirmation_events:
            return CONFIRMATION
        if name in self.email_open_events:
            return EMAIL_OPEN
        return None

    def claims(
        self,
        name: str | None,
        properties: object,
        at: float,
        identities: tuple[Identity, ...] = (),
        profile_id: str | None = None,
    ) -> tuple[tuple[Claim, ...], tuple[str, ...]]:
        """The claims a track event named ``name`` must win, and any warnings."""
        return self.claims_for(self.kind_of(name), properties, at, identities, profile_id)

    def claims_for(
        self,
        kind: str | None,
        properties: object,
        at: float,
        identities: tuple[Identity, ...] = (),
        profile_id: str | None = None,
    ) -> tuple[tuple[Claim, ...], tuple[str, ...]]:
        """The claims an event of ``kind`` must win, and any warnings.

        ``properties`` is the event's, as received (anything but an object counts as
        none); ``at`` is the event's time in epoch seconds; ``identities`` and ``profile_id``
        are what the event names its person by, read only by the email-open throttle
        (see :func:`user_key`), so other events pay nothing for them.
        """
        props: Mapping[str, object] = properties if isinstance(properties, dict) else {}
        if kind == CONFIRMATION and self.confirmation_dedup:
            order_id = _first_id(props, _ORDER_ID)
            if order_id is None:
                return (), ("confirmation without an order id: not deduplicated",)
            return (Claim(DUPLICATE_ORDER, _bounded(order_id), at),), ()
        if kind == EMAIL_OPEN and self.email_open_window is not None:
            person = user_key(identities, profile_id)
            if person is None:
                return (), ("email open without a user: not throttled",)
            parts = [person]
            for names in (_EMAIL_ID, _CAMPAIGN_ID):
                parts.append(_first_id(props, names) or "")
            key = _bounded("\x1f".join(parts))
            return (Claim(EMAIL_OPEN_THROTTLED, key, at, at + self.email_open_window),), ()
        return (), ()


# Which identifier names a person for the throttle, strongest first: an explicit user id
# outlives devices, an anonymous id is one browser.
_USER_KEY_RANK = {"user_id": 0, "email": 1, "anonymous_id": 3}
_PROFILE_RANK = 2


def user_key(identities: tuple[Identity, ...], profile_id: str | None = None) -> str | None:
    """The key an email-open throttle counts a person by (``user_id:u-1``), or None.

    Keys are built from what the event carries, so one person sending under two
    identifiers (a userId here, an email there) is throttled per identifier.
    """
    best: str | None = None
    best_rank = 99
    if profile_id is not None:
        best, best_rank = "profile:" + profile_id, _PROFILE_RANK
    for identity in identities:
        rank = _USER_KEY_RANK.get(identity.kind, 99)
        if rank < best_rank:
            best, best_rank = f"{identity.kind}:{identity.value}", rank
    return best


def _first_id(properties: Mapping[str, object], names: tuple[str, ...]) -> str | None:
    """The first of ``names`` holding a usable id. Numbers count, and are one id however
    they are written: 1042, 1042.0 and "1042" are the same order."""
    for name in names:
        value = properties.get(name)
        if isinstance(value, bool):
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, _ID_TYPES):
            text = str(value)
            if text not in ("", "nan", "inf"):
                return text
    return None


def _bounded(key: str) -> str:
    if len(key) <= _MAX_KEY_LENGTH:
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def is_browser_traffic(origin: str | None, referer: str | None, user_agent: str | None) -> bool:
    """Whether a request came from a browser: it names the page it came from (``Origin``,
    ``Referer``) or introduces itself the way every browser (and every crawler posing as
    one) does. Server SDKs and app HTTP clients do neither."""
    return bool(origin or referer) or (user_agent is not None and user_agent.startswith("Mozilla/"))


@lru_cache(maxsize=4096)
def crawler_pattern(user_agent: str) -> str | None:
    """The crawler-list pattern ``user_agent`` matches, None for a person's browser.

    Cached: a site sees the same few hundred user agents over and over, and matching
    the ~1,500 patterns costs about 0.1 ms.
    """
    from crawleruseragents import CRAWLER_USER_AGENTS_DATA, is_crawler, matching_crawlers

    if not is_crawler(user_agent):
        return None
    matches = matching_crawlers(user_agent)
    if not matches:  # pragma: no cover - is_crawler and matching_crawlers agree
        return "crawler"
    pattern = CRAWLER_USER_AGENTS_DATA[matches[0]]["pattern"]
    return str(pattern)
