"""Rules: a source's ordered edits to each event, run right after collection.

A rule is any callable taking an event message (a plain JSON-shaped dict, e.g. a
Segment message with ``type``, ``event`` or ``name``, ``properties``, ``context``) and
returning either ``None`` ("keep the changes I made in place") or a dict that replaces
the event. Each callable receives its own deep copy, so a rule that fails costs
nothing (the declarative rules below never fail half-way, so a run of them shares one):

* a rule that raises, returns something other than a dict or ``None``, leaves a value
  JSON cannot hold (a ``datetime``, a ``set``...) or breaks the event (changes its
  ``type`` or ``messageId``, removes a track event's name...) is rolled back: the event
  goes on exactly as it was before that rule, the error is recorded and the next rule
  runs. A rule never loses an event.
* after the last rule, ``properties`` (and every dict and list inside them) can no
  longer be changed: the seed's "Properties on an Event are immutable after all Rules
  have run".

>>> import hashlib
>>> def tag_plan(event):
...     event["properties"]["plan"] = "pro"
>>> def broken(event):
...     raise KeyError("oops")
>>> rules = RuleSet([RenameEvent("Order Done", "Order Completed"), broken, tag_plan,
...                  HashProperty("email")])
>>> result = rules.apply({"type": "track", "event": "Order Done", "messageId": "m-1",
...                       "userId": "u-1", "properties": {"email": "ann@example.com"}})
>>> result.event["event"], result.event["properties"]["plan"]
('Order Completed', 'pro')
>>> result.event["properties"]["email"] == hashlib.sha256(b"ann@example.com").hexdigest()
True
>>> result.errors
(RuleError(rule_index=1, rule_name='broken', message="raised KeyError: 'oops'"),)
>>> result.event["properties"]["plan"] = "free"
Traceback (most recent call last):
    ...
TypeError: event properties cannot change after the last rule

Only values JSON cannot hold by type are looked for between rules; non-finite
numbers, integers beyond 64 bits and lone surrogates are refused later by the store's
serialiser (:func:`fp_collect.decoding.encode_event`), as they are for client data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from fp_collect.errors import ConfigError, config_tuple

Event = dict[str, Any]
Rule = Callable[[Event], Event | None]

# Values copied by reference: immutable, and what a JSON parser produces.
_SCALARS = frozenset({str, int, float, bool, type(None)})
# Fields the pipeline and the store read. A rule may change them, never break them.
_STRING_FIELDS = (
    "userId",
    "anonymousId",
    "event",
    "name",
    "category",
    "groupId",
    "previousId",
    "timestamp",
    "receivedAt",
    # the Firstparty API's identifiers
    "profile_id",
    "session_id",
    "user_id",
    "anonymous_id",
    "email",
)
_OBJECT_FIELDS = ("properties", "context", "traits", "integrations")
_REQUIRED_ONCE_SET = ("timestamp", "receivedAt", "groupId", "previousId")
_MAX_ERROR_TEXT = 500


# -- immutable properties -------------------------------------------------------------
#
# Real dict and list subclasses rather than MappingProxyType and tuples: everything that
# reads an event keeps working unchanged. ujson and json serialise them as plain JSON
# (ujson.dumps refuses a mappingproxy), ``isinstance(x, dict)`` checks in validation
# still hold, and they compare equal to the plain values they hold. They guard against
# accidental change; ``dict.__setitem__(frozen, ...)`` can still force one.

_FROZEN_MESSAGE = "event properties cannot change after the last rule"


def _refuse(self: object, *args: Any, **kwargs: Any) -> NoReturn:
    raise TypeError(_FROZEN_MESSAGE)


class FrozenDict(dict[str, Any]):
    """A dict that refuses every change: an event's properties after the last rule."""

    __slots__ = ()

    def __new__(cls, items: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> FrozenDict:
        self = super().__new__(cls)
        dict.update(self, items)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Filled once by __new__: calling __init__ again must not refill it.
        pass

    def __reduce__(self) -> tuple[type[FrozenDict], tuple[dict[str, Any]]]:
        # copy, deepcopy and pickle would otherwise rebuild it through __setitem__.
        return (FrozenDict, (dict(self),))

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse


class FrozenList(list[Any]):
    """A list that refuses every change: a list inside an event's frozen properties."""

    __slots__ = ()

    def __new__(cls, items: Iterable[Any] = ()) -> FrozenList:
        self = super().__new__(cls)
        list.extend(self, items)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # list.__init__ would empty and refill it.
        pass

    def __reduce__(self) -> tuple[type[FrozenList], tuple[list[Any]]]:
        return (FrozenList, (list(self),))

    def __repr__(self) -> str:
        return f"FrozenList({list.__repr__(self)})"

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse


class NotJSON(TypeError):
    """A value JSON cannot hold (by type) was found where an event must be JSON."""


def thaw(value: Any) -> Any:
    """A deep, mutable copy of a JSON value as plain dicts and lists (tuples and frozen
    containers included). Raises :class:`NotJSON` for anything JSON cannot hold.

    Recursing over dicts and lists is about four times faster than ``copy.deepcopy``,
    which matters on the request path: each rule gets one such copy.
    """
    if isinstance(value, dict):
        return {k: (v if type(v) in _SCALARS else thaw(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [(v if type(v) in _SCALARS else thaw(v)) for v in value]
    if isinstance(value, (str, int, float)) or value is None:
        # Subclasses such as a str-valued Enum: ujson writes them as their base type.
        return value
    raise NotJSON(f"{type(value).__name__} is not a JSON value")


def freeze(value: Any) -> Any:
    """A deep, immutable copy of a JSON value (:class:`FrozenDict`, :class:`FrozenList`).
    Raises :class:`NotJSON` for anything JSON cannot hold."""
    if isinstance(value, dict):
        # Built with the base class's C methods: calling FrozenDict() costs twice as much.
        frozen_dict = _new_dict(FrozenDict)
        _fill_dict(
            frozen_dict, {k: (v if type(v) in _SCALARS else freeze(v)) for k, v in value.items()}
        )
        return frozen_dict
    if isinstance(value, (list, tuple)):
        frozen_list = _new_list(FrozenList)
        _fill_list(frozen_list, [(v if type(v) in _SCALARS else freeze(v)) for v in value])
        return frozen_list
    if isinstance(value, (str, int, float)) or value is None:
        return value
    raise NotJSON(f"{type(value).__name__} is not a JSON value")


_new_dict, _fill_dict = dict.__new__, dict.update
_new_list, _fill_list = list.__new__, list.extend


def _finished(event: Event) -> Event:
    """The event as it leaves the rules: a detached copy, properties frozen."""
    finished: Event = {}
    for key, value in event.items():
        if type(value) in _SCALARS:
            finished[key] = value
        elif key == "properties" and isinstance(value, dict):
            finished[key] = freeze(value)
        else:
            finished[key] = thaw(value)
    return finished


# -- declarative rules ----------------------------------------------------------------


def _name_field(event: Event) -> str:
    # Firstparty events carry no type: like track, they are named by "event".
    return "event" if event.get("type", "track") == "track" else "name"


def _non_empty(owner: str, name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{owner}.{name} must be a non-empty string, got {value!r}")


@dataclass(frozen=True, slots=True)
class RenameEvent:
    """Rename events called ``from_name`` to ``to_name``: the ``event`` field of track
    messages, ``name`` of the others (page, screen). Other names are left alone.

    >>> event = {"type": "track", "event": "signup", "messageId": "m-1"}
    >>> RenameEvent("signup", "Account Created")(event); event["event"]
    'Account Created'
    """

    from_name: str
    to_name: str

    def __post_init__(self) -> None:
        _non_empty("RenameEvent", "from_name", self.from_name)
        _non_empty("RenameEvent", "to_name", self.to_name)

    def __call__(self, event: Event) -> None:
        name_field = _name_field(event)
        if event.get(name_field) == self.from_name:
            event[name_field] = self.to_name


@dataclass(frozen=True, slots=True)
class DropProperty:
    """Remove one property (a no-op when it is absent)."""

    name: str

    def __post_init__(self) -> None:
        _non_empty("DropProperty", "name", self.name)

    def __call__(self, event: Event) -> None:
        properties = event.get("properties")
        if isinstance(properties, dict):
            properties.pop(self.name, None)


@dataclass(frozen=True, slots=True)
class HashProperty:
    """Replace one property by a SHA-256 hex digest, to keep a value countable and
    joinable without keeping it (an email address, an account number).

    The digest is of ``salt + text`` encoded as UTF-8, where ``text`` is the value
    itself when it is a string and otherwise its canonical JSON (keys sorted, no
    spaces, non-ASCII kept), so ``42`` and ``"42"`` hash alike. To reproduce one::

        hashlib.sha256((salt + "ann@example.com").encode()).hexdigest()

    Absent and ``null`` properties are left alone. The salt is never shown in the
    rule's ``repr`` (nor, therefore, in recorded rule errors).
    """

    name: str
    salt: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        _non_empty("HashProperty", "name", self.name)
        if not isinstance(self.salt, str):
            raise ConfigError("HashProperty.salt must be a string")

    def __call__(self, event: Event) -> None:
        properties = event.get("properties")
        if not isinstance(properties, dict):
            return
        value = properties.get(self.name)
        if value is None:
            return
        if not isinstance(value, str):
            value = json.dumps(
                value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
            )
        # surrogatepass: a lone surrogate still hashes (and the digest is storable).
        data = (self.salt + value).encode("utf-8", "surrogatepass")
        properties[self.name] = hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class CopyContextField:
    """Copy a value from ``context`` into a property, e.g. ``CopyContextField(
    "campaign.source", "utm_source")``. ``path`` is dotted and starts inside
    ``context``; when any step is missing (or not an object) nothing changes. An
    existing property of that name is overwritten.
    """

    path: str
    to_property: str
    _steps: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _non_empty("CopyContextField", "path", self.path)
        _non_empty("CopyContextField", "to_property", self.to_property)
        steps = tuple(self.path.split("."))
        if not all(steps):
            raise ConfigError(f"CopyContextField.path {self.path!r} has an empty step")
        if steps[0] == "context" and len(steps) > 1:
            # Almost always a mistake; a context key really named "context" is rarer.
            raise ConfigError(
                f"CopyContextField.path starts inside context: write {'.'.join(steps[1:])!r}"
            )
        object.__setattr__(self, "_steps", steps)

    def __call__(self, event: Event) -> None:
        value: Any = event.get("context")
        for step in self._steps:
            if not isinstance(value, dict) or step not in value:
                return
            value = value[step]
        properties = event.get("properties")
        if properties is None:
            properties = event["properties"] = {}
        elif not isinstance(properties, dict):
            raise TypeError("properties is not an object")
        # A copy: properties and context must not share a dict or list.
        properties[self.to_property] = value if type(value) in _SCALARS else thaw(value)


# Rules that change nothing when they raise and cannot break an event: RuleSet runs a
# sequence of them on one copy, without the copy and check each user callable needs.
# Exact types: a subclass may override __call__ and lose both properties.
_ALL_OR_NOTHING = frozenset({RenameEvent, DropProperty, HashProperty, CopyContextField})


# -- running rules --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleError:
    """One rule that was rolled back for one event: where it sits, what it is, why."""

    rule_index: int
    rule_name: str
    message: str


@dataclass(frozen=True, slots=True)
class RulesResult:
    """The event after every rule (``properties`` frozen, unless there were no rules:
    then it is the very event given) and the rules that were rolled back."""

    event: Event
    errors: tuple[RuleError, ...] = ()


@dataclass(frozen=True, slots=True)
class RuleSet:
    """A source's rules, run in order by :meth:`apply`.

    :param rules: callables ``(event) -> dict | None``, declarative rules included.

    >>> RuleSet([DropProperty("email")]).apply(
    ...     {"type": "page", "name": "Home", "properties": {"email": "a@b.example"}}
    ... ).event
    {'type': 'page', 'name': 'Home', 'properties': FrozenDict({})}
    """

    rules: Sequence[Rule] = ()

    def __post_init__(self) -> None:
        if callable(self.rules) or isinstance(self.rules, (str, bytes, Mapping)):
            raise ConfigError("RuleSet takes a list of rules, e.g. RuleSet([rule])")
        rules = config_tuple(self.rules, "rules")
        for index, rule in enumerate(rules):
            if not callable(rule):
                raise ConfigError(f"rule {index} ({rule!r}) is not callable")
        object.__setattr__(self, "rules", rules)

    def __len__(self) -> int:
        return len(self.rules)

    def apply(self, event: Event) -> RulesResult:
        """Run every rule on ``event``, which is never changed itself.

        Never raises for a JSON object; raises :class:`NotJSON` (a ``TypeError``) if
        ``event`` holds a value JSON cannot, which only a caller's bug can produce.
        """
        if not self.rules:
            # The common case costs nothing: no copy, no freezing.
            return RulesResult(event)
        errors: list[RuleError] = []
        last = len(self.rules) - 1
        # `accepted` is the event after the last rule that succeeded; a rule never gets
        # it, only a copy. It is `private` when it is our own copy that no callable has
        # seen: declarative rules then edit it in place, with no copy or check each.
        # `spare` is a private copy equal to `accepted`, made in advance, or None.
        accepted, private, spare = event, False, None
        for index, rule in enumerate(self.rules):
            if type(rule) in _ALL_OR_NOTHING:
                if not private:
                    accepted = spare if spare is not None else thaw(accepted)
                    private, spare = True, None
                try:
                    rule(accepted)
                except Exception as exc:  # noqa: BLE001 - a rule's failure must never cost the event
                    # These raise before changing anything, and never break an event.
                    errors.append(RuleError(index, _rule_name(rule), _raised(exc)))
                continue
            working = spare if spare is not None else thaw(accepted)
            spare = None
            problem: str | None
            try:
                returned = rule(working)
                candidate = working if returned is None else returned
                problem = _broken(accepted, candidate)
                if problem is None:
                    # Copying the output also proves it is JSON, and detaches it from
                    # anything the rule kept a reference to.
                    spare = _finished(candidate) if index == last else thaw(candidate)
                    accepted, private = candidate, False
            except NotJSON as exc:
                problem = f"left a value JSON cannot hold: {exc}"
            except Exception as exc:  # noqa: BLE001 - a rule's failure must never cost the event
                problem = _raised(exc)
            if problem is not None:
                # _text: a problem may quote any value the rule produced.
                errors.append(RuleError(index, _rule_name(rule), _text(problem)))
        if private:
            properties = accepted.get("properties")
            if isinstance(properties, dict):
                accepted["properties"] = freeze(properties)
            final = accepted
        else:
            # A spare left over is the last rule's output, already finished.
            final = spare if spare is not None else _finished(accepted)
        return RulesResult(final, tuple(errors))


def _broken(before: Event, after: object) -> str | None:
    """What ``after`` breaks that ``before`` had right, or None. Only fields that were
    valid are held to it, so a rule is never blamed for its input."""
    if not isinstance(after, dict):
        return f"returned {type(after).__name__}, not a dict or None"
    for name in ("type", "messageId", "message_id"):
        if after.get(name) != before.get(name):
            return f"changed {name} from {before.get(name)!r} to {after.get(name)!r}"
    if (
        before.get("type", "track") == "track"
        and _text_field(before.get("event"))
        and not _text_field(after.get("event"))
    ):
        return "left the track event without a name (event must be a non-empty string)"
    # Inlined tests: this runs after every rule, on the request path.
    for name in _STRING_FIELDS:
        value = after.get(name)
        if value is not None and not isinstance(value, str) and _string_or_none(before.get(name)):
            return f"set {name} to a {type(value).__name__}, not a string"
    for name in _OBJECT_FIELDS:
        value = after.get(name)
        if value is not None and not isinstance(value, dict) and _object_or_none(before.get(name)):
            return f"set {name} to a {type(value).__name__}, not an object"
    for name in _REQUIRED_ONCE_SET:
        if not after.get(name) and _text_field(before.get(name)):
            return f"removed {name}"
    if not (after.get("userId") or after.get("anonymousId")) and (
        _text_field(before.get("userId")) or _text_field(before.get("anonymousId"))
    ):
        return "removed both userId and anonymousId"
    return None


def _raised(exc: Exception) -> str:
    return f"raised {type(exc).__name__}: {_text(exc)}"


def _text_field(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _string_or_none(value: object) -> bool:
    return value is None or isinstance(value, str)


def _object_or_none(value: object) -> bool:
    return value is None or isinstance(value, dict)


def _rule_name(rule: Rule) -> str:
    """A function's name, or a rule object's repr (declarative rules show their
    arguments, never a salt)."""
    name = getattr(rule, "__qualname__", None)
    if isinstance(name, str):
        return name
    try:
        return _text(repr(rule))
    except Exception:  # noqa: BLE001 - a broken __repr__ must not cost the event either
        return type(rule).__qualname__


def _text(value: object) -> str:
    """Printable, storable text, short enough to keep with every event."""
    try:
        text = str(value)
    except Exception:  # noqa: BLE001 - a broken __str__ must not cost the event either
        text = f"<unprintable {type(value).__name__}>"
    if len(text) > _MAX_ERROR_TEXT:
        text = text[: _MAX_ERROR_TEXT - 3] + "..."
    # A lone surrogate in a message would make the record unstorable.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
