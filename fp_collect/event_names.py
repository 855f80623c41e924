"""Event-name guidelines (seed 002): a noun plus a past-tense verb, Title Case, A-Z only,
single spaces between words, as in "Page Viewed".

Names that break them are still accepted, with warnings users can list;
:class:`EventNamePolicy` with ``strict=True`` rejects them instead.

>>> check_event_name("Page Viewed")
[]
>>> check_event_name("Button clicked")
["Not Title Case: write 'Button Clicked'."]
>>> EventNamePolicy(strict=True).evaluate("Cart-Abandoned").reject
True

Whether the last word is a past-tense verb is a heuristic: it ends in "ed" or is one
of the common irregular past tenses below ("Sent", "Built", "Paid", "Password Reset"
works too); a trailing particle is skipped ("User Logged In", "Account Signed Up").
Acronyms count as words to Title Case ("Api Key Created", not "API Key Created").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import groupby

from fp_collect.errors import ConfigError

# Common irregular past tenses (and past participles) that do not end in "ed".
IRREGULAR_PAST_TENSES = frozenset(
    """
    became begun began bent bet bid bought bound broke broken brought built burnt
    came caught chose chosen cut dealt did done drew drawn drove driven dug ate eaten
    fell felt fought found flew flown forgot forgotten forgave forgiven froze frozen
    gave given got gotten gone went grew grown heard held hid hidden hit hung kept
    knew known laid left lent let lit lost made meant met paid put quit ran rang read
    rebuilt redone reset resent rewritten rewrote rode rose said sang sat saw seen
    sent set shot shown shut sold sought spent split spoke spoken spread stood stole
    stolen struck stuck sung swept swore sworn taken taught thought threw thrown told
    took tore torn undone understood upheld withdrawn withdrew won woke woken wore
    worn wound wrote written
    """.split()  # noqa: SIM905 - a word list reads better as text
)
# Words after the verb in phrasal verbs: "Logged In", "Signed Up", "Checked Out".
_PARTICLES = frozenset(("up", "in", "out", "on", "off", "down", "over", "back", "away", "through"))

# Where camelCase words meet, for the suggested spelling of "pageViewed".
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_ALLOWED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz ")
_DIGITS = frozenset("0123456789")
_EXAMPLE = "e.g. 'Page Viewed'"
# Names repeat a lot, so verdicts are cached; a long name is checked every time
# instead, so that hostile clients cannot fill the cache with large strings.
_MAX_CACHED_LENGTH = 200


def check_event_name(name: str) -> list[str]:
    """The ways ``name`` breaks the guidelines, as short sentences; empty if none.

    >>> check_event_name("Product 126")  # doctest: +NORMALIZE_WHITESPACE
    ["Contains numbers ('1', '2', '6'): use words, A-Z only.",
     "Needs a noun and a past-tense verb, e.g. 'Page Viewed'."]
    """
    return list(_problems(name) if len(name) <= _MAX_CACHED_LENGTH else _find_problems(name))


@lru_cache(maxsize=4096)
def _problems(name: str) -> tuple[str, ...]:
    return _find_problems(name)


def _find_problems(name: str) -> tuple[str, ...]:
    if not isinstance(name, str):
        raise TypeError(f"an event name is a string, got {type(name).__name__}")
    if not name:
        return ("The name is empty.",)
    problems = []
    # Words are runs of letters in any script: "Página" is one word, not "P" + "gina".
    runs = [(alpha, "".join(run)) for alpha, run in groupby(name, str.isalpha)]
    words = [run for alpha, run in runs if alpha]
    if not all(_title_case(word) for word in words):
        suggestion = "".join(_title_cased(run) if alpha else run for alpha, run in runs)
        problems.append(f"Not Title Case: write {suggestion!r}.")
    digits = sorted(_DIGITS.intersection(name))
    if digits:
        problems.append(f"Contains numbers ({_listed(digits)}): use words, A-Z only.")
    others = sorted(set(name) - _ALLOWED - _DIGITS)
    if others:
        problems.append(
            f"Contains special characters ({_listed(others)}): use A-Z and single spaces only."
        )
    if name.startswith(" ") or name.endswith(" "):
        problems.append("Starts or ends with a space.")
    if "  " in name:
        problems.append("Has more than one space between words.")
    if len(words) < 2:
        problems.append(f"Needs a noun and a past-tense verb, {_EXAMPLE}.")
    elif not _past_tense(words):
        problems.append(
            f"Does not end in a past-tense verb ({words[-1]!r}): "
            f"use a noun and a past-tense verb, {_EXAMPLE}."
        )
    return tuple(problems)


def _title_case(word: str) -> bool:
    return word[0].isupper() and (len(word) == 1 or word[1:].islower())


def _title_cased(word: str) -> str:
    return " ".join(part.capitalize() for part in _CAMEL.split(word))


def _past_tense(words: list[str]) -> bool:
    verb = words[-1].lower()
    if verb in _PARTICLES:
        verb = words[-2].lower()
    return verb.endswith("ed") or verb in IRREGULAR_PAST_TENSES


def _listed(characters: list[str]) -> str:
    shown = ", ".join(repr(c) for c in characters[:5])
    return shown + ", ..." if len(characters) > 5 else shown


@dataclass(frozen=True, slots=True)
class NameVerdict:
    """What a policy decided about one name.

    :param ok: the name follows the guidelines.
    :param warnings: how it breaks them (empty when ``ok``), to record and list.
    :param reject: refuse the event (strict policy only); record it, never drop it.
    """

    ok: bool
    warnings: tuple[str, ...]
    reject: bool


@dataclass(frozen=True, slots=True)
class EventNamePolicy:
    """How a source treats event names that break the guidelines.

    :param strict: reject such events instead of accepting them with warnings.
    """

    strict: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.strict, bool):
            raise ConfigError(f"EventNamePolicy.strict must be True or False, got {self.strict!r}")

    def evaluate(self, name: str) -> NameVerdict:
        if len(name) <= _MAX_CACHED_LENGTH:
            return _verdict(name, self.strict)
        return _decide(_find_problems(name), self.strict)


@lru_cache(maxsize=4096)
def _verdict(name: str, strict: bool) -> NameVerdict:
    return _decide(_problems(name), strict)


def _decide(problems: tuple[str, ...], strict: bool) -> NameVerdict:
    return NameVerdict(ok=not problems, warnings=problems, reject=strict and bool(problems))
