"""The collector's configuration: one object, validated eagerly with clear errors."""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from dataclasses import fields as fields_of
from typing import TYPE_CHECKING

from fp_collect.errors import (
    MAX_WINDOW_SECONDS,
    ConfigError,
    check_bool,
    check_seconds,
    config_tuple,
    shown,
)
from fp_collect.restrictions import Restrictions
from fp_collect.rules import Rule, RuleSet
from fp_collect.store import redact

KIB = 1024
# A request waiting for its commit longer than an hour has long been given up by any
# client or proxy in front of it; larger values would only disable the deadline.
MAX_COMMIT_TIMEOUT = 3600.0
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Source:
    """A place events come from (a website, an app, a server), owning one write key.

    :param write_key: the public key clients send (Basic username, ``writeKey``).
    :param id: stable identifier stored with every event; derived from the key if omitted.
    :param name: a human label.
    :param enabled: a disabled source's key is answered exactly like an unknown key.
    :param allowed_origins: browser origins (``https://shop.example``) allowed to send
        events for this source; ``"*"`` allows any. Requests without an ``Origin``
        header (server SDKs, mobile apps) are never refused on this ground.
    :param workspace: the workspace the source belongs to; sources of one workspace
        share profiles (a visitor known to the website is known to the app).
    :param session_timeout: seconds of inactivity after which a visitor's next event
        starts a new session; None turns sessions off for this source.
    :param rules: edits run on each event right after collection, in order (callables
        or the declarative rules of :mod:`fp_collect.rules`); see :class:`RuleSet`.
    :param strict_event_names: refuse (and record) track events whose names break the
        naming guidelines, instead of storing them with warnings.
    :param restrictions: what is discarded though valid: bots, repeated confirmations,
        email opens within the throttle window; see :class:`Restrictions`.
    :param partial_success_status: the status of a batch some of whose events were
        refused: 207, the seed's, or 200 for clients that take only 200 as success and
        would send the whole batch again (rudder-sdk-python). The body is the same.
    """

    write_key: str
    id: str = ""
    name: str = ""
    enabled: bool = True
    allowed_origins: tuple[str, ...] = ("*",)
    workspace: str = "default"
    session_timeout: float | None = 30 * 60.0
    rules: RuleSet = field(default_factory=RuleSet)
    strict_event_names: bool = False
    restrictions: Restrictions = field(default_factory=Restrictions)
    partial_success_status: int = 207

    if TYPE_CHECKING:
        # The constructor as type checkers should see it: lists (and any iterable) are as
        # welcome as tuples, and one origin may be a plain string; __post_init__ makes
        # them tuples (and the rules a RuleSet), which is what the fields hold. The
        # dataclass's own __init__ takes exactly these parameters at run time (a test
        # compares the two).
        def __init__(
            self,
            write_key: str,
            id: str = "",
            name: str = "",
            enabled: bool = True,
            allowed_origins: str | Iterable[str] = ("*",),
            workspace: str = "default",
            session_timeout: float | None = 30 * 60.0,
            rules: RuleSet | Iterable[Rule] = RuleSet(),
            strict_event_names: bool = False,
            restrictions: Restrictions = Restrictions(),
            partial_success_status: int = 207,
        ) -> None: ...

    def __post_init__(self) -> None:
        if not isinstance(self.write_key, str) or not self.write_key:
            raise ConfigError("Source.write_key must be a non-empty string")
        try:
            self.write_key.encode("utf-8")
        except UnicodeEncodeError as exc:
            # os.environ turns undecodable bytes into lone surrogates.
            raise ConfigError("Source.write_key must be valid UTF-8 text") from exc
        if ":" in self.write_key:
            # HTTP Basic splits user:password at the first colon.
            raise ConfigError("Source.write_key must not contain ':'")
        check_bool(self.enabled, "Source.enabled")
        # The id is stored with every event and the name shown: a number here would be
        # stored as something else than what the file says, or fail deep in a store.
        # None is "not given", as "" is (id=os.environ.get("SOURCE_ID"), say).
        for name in ("id", "name"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, "")
        if not isinstance(self.id, str):
            raise ConfigError(f"Source.id must be a string, not {type(self.id).__name__}")
        if not isinstance(self.name, str):
            raise ConfigError(f"Source.name must be a string, not {type(self.name).__name__}")
        if not self.id:
            digest = hashlib.sha256(self.write_key.encode()).hexdigest()[:16]
            object.__setattr__(self, "id", f"src_{digest}")
        object.__setattr__(
            self, "allowed_origins", _strings(self.allowed_origins, "Source.allowed_origins")
        )
        if not isinstance(self.rules, RuleSet):
            # A plain list of rules is welcome too.
            object.__setattr__(self, "rules", RuleSet(self.rules))
        check_bool(self.strict_event_names, "Source.strict_event_names")
        if not isinstance(self.restrictions, Restrictions):
            raise ConfigError("Source.restrictions must be a Restrictions object")
        if not isinstance(self.workspace, str) or not self.workspace:
            raise ConfigError("Source.workspace must be a non-empty string")
        if self.session_timeout is not None:
            check_seconds(
                self.session_timeout, "Source.session_timeout", MAX_WINDOW_SECONDS, none=True
            )
        # A whole number (HTTPStatus.OK is one), kept as a plain int: True or 200.0 would
        # compare equal and reach the HTTP layer.
        status = self.partial_success_status
        if not isinstance(status, int) or isinstance(status, bool) or status not in (200, 207):
            raise ConfigError("Source.partial_success_status must be 207 or 200")
        object.__setattr__(self, "partial_success_status", int(status))
        for origin in self.allowed_origins:
            if origin != "*" and ("://" not in origin or origin.endswith("/")):
                raise ConfigError(
                    f"allowed origin {origin!r} must look like 'https://example.com' "
                    "(scheme and host, no trailing slash) or be '*'"
                )

    def allows_origin(self, origin: str | None) -> bool:
        if origin is None:
            return True
        return "*" in self.allowed_origins or origin in self.allowed_origins


@dataclass(frozen=True, slots=True)
class Workspace:
    """A group of sources that share profiles: a visitor identified on the website is
    the same person in the app. Its sources' ``workspace`` is set to its ``id``.

    >>> workspace = Workspace("rosebud", sources=[Source(write_key="www-key", id="www")])
    >>> workspace.sources[0].workspace
    'rosebud'
    """

    id: str
    name: str = ""
    sources: tuple[Source, ...] = ()

    if TYPE_CHECKING:
        # Any iterable of sources, made a tuple by __post_init__ (see Source's).
        def __init__(self, id: str, name: str = "", sources: Iterable[Source] = ()) -> None: ...

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError("Workspace.id must be a non-empty string")
        if self.name is None:
            object.__setattr__(self, "name", "")
        if not isinstance(self.name, str):
            raise ConfigError(f"Workspace.name must be a string, not {type(self.name).__name__}")
        sources = config_tuple(self.sources, f"workspace {self.id!r}: sources")
        if not all(isinstance(s, Source) for s in sources):
            raise ConfigError(f"workspace {self.id!r}: sources must be Source objects")
        object.__setattr__(self, "sources", tuple(replace(s, workspace=self.id) for s in sources))


@dataclass(frozen=True, slots=True)
class Limits:
    """Size and shape limits. Defaults are the HTTP Tracking API's documented ones."""

    # "a maximum of 15KB per call"
    max_call_bytes: int = 15 * KIB
    # "our batch endpoint accepts a maximum of 500KB per batch"
    max_batch_bytes: int = 500 * KIB
    # "... and 15KB per call" inside a batch
    max_event_bytes: int = 15 * KIB
    # Events in one batch. No client sends more than a few hundred (the Python SDKs 100,
    # analytics.js 10); the cap bounds what one small gzipped body of tiny items can cost
    # in records and answer size, since the write key (public in a page) is no barrier.
    max_batch_events: int = 2_500
    # deeper JSON than this is refused before anything walks it recursively
    max_depth: int = 64
    # longest messageId (a dedup key), userId, anonymousId, groupId or previousId: all are
    # index keys in the stores
    max_message_id_length: int = 255

    def __post_init__(self) -> None:
        for name, maximum in _LIMIT_MAXIMA.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= maximum:
                raise ConfigError(
                    f"Limits.{name} must be a whole number from 1 to {maximum}, got {shown(value)}"
                )


_LIMIT_MAXIMA = {
    # Bodies are held in memory, and a decompression limit is a C ssize_t: beyond it a
    # gzipped request would fail with an OverflowError instead of a 413.
    "max_call_bytes": 1024 * 1024 * KIB,
    "max_batch_bytes": 1024 * 1024 * KIB,
    "max_event_bytes": 1024 * 1024 * KIB,
    "max_batch_events": 100_000,
    # Rules copy nested values recursively, two frames a level: 256 levels leave room
    # below Python's recursion limit (1000) for the server's and the app's own frames.
    "max_depth": 256,
    # Ids are index keys: 512 characters of up to 4 UTF-8 bytes stay under PostgreSQL's
    # B-tree entry limit (about 2700 bytes).
    "max_message_id_length": 512,
}


@dataclass(frozen=True, slots=True)
class CollectorConfig:
    """Everything the collector needs to know.

    :param sources: the sources whose write keys are accepted.
    :param workspaces: more sources, grouped; see :class:`Workspace`.
    :param storage: a storage URL: ``sqlite:///path.db`` (default), ``memory://``.
    :param prefix: where the routes live inside the host app, e.g. ``"/collect"`` gives
        ``/collect/v1/track``. Empty mounts them at the root.
    :param limits: size limits, see :class:`Limits`.
    :param trusted_proxies: addresses or CIDR networks of reverse proxies whose
        ``X-Forwarded-For`` is believed when setting ``context.ip``.
    :param max_future_seconds: a corrected timestamp further than this ahead of
        ``receivedAt`` is replaced by ``receivedAt``.
    :param record_unauthenticated: also record requests refused with no valid write key
        (a bad one, or none that could be read), so a misconfigured client shows up in
        ``fp-collect rejections``. A refused request whose key is valid is always recorded.
    :param commit_timeout: seconds a request waits for its commit before it is
        answered 503 (the events may still be written; clients retry and dedup holds).
    :param read_tokens: secret tokens that may read events and profiles back through
        ``GET /events`` and ``GET /profiles/{id}`` (``Authorization: Bearer``). With
        none, the read API is not mounted at all.
    """

    sources: tuple[Source, ...] = ()
    workspaces: tuple[Workspace, ...] = ()
    storage: str = "sqlite:///fp_collect.db"
    prefix: str = ""
    limits: Limits = field(default_factory=Limits)
    trusted_proxies: tuple[str, ...] = ()
    max_future_seconds: float = 300.0
    record_unauthenticated: bool = True
    commit_timeout: float = 10.0
    read_tokens: tuple[str, ...] = ()

    if TYPE_CHECKING:
        # Any iterables, made tuples by __post_init__; one proxy or token may be a plain
        # string (see Source's).
        def __init__(
            self,
            sources: Iterable[Source] = (),
            workspaces: Iterable[Workspace] = (),
            storage: str = "sqlite:///fp_collect.db",
            prefix: str = "",
            limits: Limits = Limits(),
            trusted_proxies: str | Iterable[str] = (),
            max_future_seconds: float = 300.0,
            record_unauthenticated: bool = True,
            commit_timeout: float = 10.0,
            read_tokens: str | Iterable[str] = (),
        ) -> None: ...

    def __post_init__(self) -> None:
        sources = config_tuple(self.sources, "sources")
        if not all(isinstance(s, Source) for s in sources):
            raise ConfigError("sources must be Source objects")
        workspaces = config_tuple(self.workspaces, "workspaces")
        if not all(isinstance(w, Workspace) for w in workspaces):
            raise ConfigError("workspaces must be Workspace objects")
        object.__setattr__(self, "workspaces", workspaces)
        # Skipping those already here: dataclasses.replace() hands back the merged tuple.
        sources += tuple(
            source
            for workspace in workspaces
            for source in workspace.sources
            if source not in sources
        )
        object.__setattr__(self, "sources", sources)
        seen_keys: set[str] = set()
        seen_ids: set[str] = set()
        for source in sources:
            if source.write_key in seen_keys:
                raise ConfigError(f"two sources share the write key of source {source.id!r}")
            if source.id in seen_ids:
                raise ConfigError(f"two sources share the id {source.id!r}")
            seen_keys.add(source.write_key)
            seen_ids.add(source.id)
        object.__setattr__(self, "prefix", normalise_prefix(self.prefix))
        if not isinstance(self.storage, str) or "://" not in self.storage:
            # What was given is not shown: it may hold a password in a form that cannot
            # be told apart without the "://".
            storage = self.storage
            got = "no '://'" if isinstance(storage, str) else type(storage).__name__
            raise ConfigError(
                f"storage must be a URL such as 'sqlite:///events.db' or 'memory://', got {got}"
            )
        # Not _strings: ipaddress objects are welcome too, and proxy_networks() below says
        # what is wrong with an entry.
        proxies = config_tuple(self.trusted_proxies, "trusted_proxies", one_string=True)
        object.__setattr__(self, "trusted_proxies", proxies)
        self.proxy_networks()  # validates
        check_bool(self.record_unauthenticated, "record_unauthenticated")
        check_seconds(self.max_future_seconds, "max_future_seconds", MAX_WINDOW_SECONDS, zero=True)
        # A NaN deadline would make every commit fail (and escape a WSGI server as a 500),
        # an infinite one would let a stalled store hold requests forever.
        check_seconds(self.commit_timeout, "commit_timeout", MAX_COMMIT_TIMEOUT)
        object.__setattr__(self, "read_tokens", _strings(self.read_tokens, "read_tokens"))
        for index, token in enumerate(self.read_tokens):
            # A token arrives in a Bearer header, stripped, and compared byte for byte:
            # one with surrounding spaces, a control character or a non-ASCII letter
            # could never be presented. The message names the entry, never the secret.
            if not (token.isascii() and token.isprintable()) or token != token.strip():
                raise ConfigError(
                    f"read_tokens[{index}] must be printable ASCII without leading or "
                    "trailing spaces (it could never match an Authorization header)"
                )
            if len(token) < 16:
                raise ConfigError("each read token must be a secret of at least 16 characters")
            if any(token == source.write_key for source in self.sources):
                raise ConfigError("a read token must not be a write key: write keys are public")

    def __repr__(self) -> str:
        # A repr lands in logs and tracebacks: read tokens are secrets, and the storage
        # URL may carry a password. Write keys are public by design and stay.
        shown = {"storage": redact(self.storage), "read_tokens": _Hidden(len(self.read_tokens))}
        fields = [f"{f.name}={shown.get(f.name, getattr(self, f.name))!r}" for f in fields_of(self)]
        return f"CollectorConfig({', '.join(fields)})"

    def proxy_networks(self) -> tuple[IPNetwork, ...]:
        networks = []
        for entry in self.trusted_proxies:
            # ip_network() takes an int as an address (10 is 0.0.0.10): never what a
            # configuration meant, so only text and ipaddress objects are proxies.
            if not isinstance(entry, (str, *_IP_TYPES)):
                raise ConfigError(
                    f"trusted proxy {entry!r} must be a string such as '10.0.0.0/8', "
                    f"not {type(entry).__name__}"
                )
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError as exc:
                raise ConfigError(f"trusted proxy {entry!r} is not an address or CIDR") from exc
        return tuple(networks)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: object) -> CollectorConfig:
        """Load a TOML configuration file; see :mod:`fp_collect.config_file`."""
        from fp_collect.config_file import load_config

        return load_config(path, **overrides)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: object
    ) -> CollectorConfig:
        """Build a configuration from ``FP_COLLECT_*`` variables.

        ``FP_COLLECT_STORAGE``, ``FP_COLLECT_PREFIX``, ``FP_COLLECT_WRITE_KEY`` (one or
        more keys separated by commas), ``FP_COLLECT_ALLOWED_ORIGINS`` (comma separated)
        and ``FP_COLLECT_TRUSTED_PROXIES`` (comma separated). Keyword overrides win.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        if env.get("FP_COLLECT_STORAGE"):
            values["storage"] = env["FP_COLLECT_STORAGE"]
        if env.get("FP_COLLECT_PREFIX"):
            values["prefix"] = env["FP_COLLECT_PREFIX"]
        if env.get("FP_COLLECT_TRUSTED_PROXIES"):
            values["trusted_proxies"] = tuple(_split(env["FP_COLLECT_TRUSTED_PROXIES"]))
        if env.get("FP_COLLECT_WRITE_KEY"):
            origins = tuple(_split(env.get("FP_COLLECT_ALLOWED_ORIGINS", "*"))) or ("*",)
            values["sources"] = tuple(
                Source(write_key=key, allowed_origins=origins)
                for key in _split(env["FP_COLLECT_WRITE_KEY"])
            )
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def normalise_prefix(prefix: str) -> str:
    if not isinstance(prefix, str):
        raise ConfigError("prefix must be a string such as '/collect'")
    prefix = prefix.strip()
    if prefix in ("", "/"):
        return ""
    if not prefix.startswith("/"):
        prefix = "/" + prefix
    # Routes are matched against the request's path as the server decoded it, so a
    # prefix is written decoded too (a client's "%20" arrives as a space, which a prefix
    # may hold). "%", "?" and "#" are refused as almost certainly a mistake: a client
    # would have to escape them. So are control characters, non-ASCII letters (WSGI and
    # ASGI decode those differently) and "." or ".." steps (clients remove them).
    steps = prefix.split("/")[1:]
    if (
        any(c in "%?#" or not (c.isascii() and c.isprintable()) for c in prefix)
        or "//" in prefix
        or any(step in (".", "..") for step in steps)
    ):
        raise ConfigError(
            f"prefix {prefix!r} must be a plain path such as '/collect' (printable ASCII"
            " between slashes, written as the server decodes it: no %-escapes, ? or #)"
        )
    return prefix.rstrip("/")


class _Hidden:
    """Stands for secrets in a repr: how many, not what."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __repr__(self) -> str:
        return f"<{self.count} hidden>"


_IP_TYPES = (
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
)


def _strings(value: str | Iterable[str], what: str) -> tuple[str, ...]:
    """A collection of strings as a tuple; a string alone is one item, not its letters.
    The error names the entry and its type, never its value (read tokens are secrets)."""
    items = config_tuple(value, what, one_string=True)
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise ConfigError(f"{what}[{index}] must be a string, not {type(item).__name__}")
    return items


def _split(value: str) -> Iterable[str]:
    return (part.strip() for part in value.split(",") if part.strip())
