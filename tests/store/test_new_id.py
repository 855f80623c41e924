"""Generated ids: the seeds' form, time first, random after."""

from __future__ import annotations

import itertools
import re
import time

import pytest

from fp_collect.store.identity import new_id

FORM = re.compile(r"PR[0-9A-F]{30}")


def test_the_form_is_the_prefix_and_30_upper_case_hex_digits() -> None:
    for prefix in ("PR", "SE", "EV"):
        made = new_id(prefix)
        assert made.startswith(prefix) and re.fullmatch(r"[0-9A-F]{30}", made[2:]), made
    assert FORM.fullmatch(new_id("PR"))


def test_the_first_12_digits_are_the_time_in_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    made = new_id("PR")
    after = time.time_ns() // 1_000_000
    assert before <= int(made[2:14], 16) <= after


def test_later_ids_sort_after_earlier_ones() -> None:
    earlier = new_id("SE")
    time.sleep(0.002)
    assert new_id("SE") > earlier


def test_the_rest_is_random_even_within_one_millisecond() -> None:
    made = [new_id("PR") for _ in range(2000)]
    assert len(set(made)) == len(made)
    tails = [int(m[14:], 16) for m in made]
    # Not a counter: consecutive ids of one millisecond are not one apart (a guessable
    # neighbour); at random, a difference of exactly one is a 1 in 2**71 event.
    assert not any(abs(b - a) == 1 for a, b in itertools.pairwise(tails))
    assert len({m[14:16] for m in made}) > 200  # the top random byte takes most values


def test_a_clock_stepping_back_does_not_take_ids_back(monkeypatch: pytest.MonkeyPatch) -> None:
    ahead = new_id("PR")
    stamp = int(ahead[2:14], 16)
    # new_id() reads time.time_ns() (fp_collect.store.identity imports the module).
    monkeypatch.setattr(time, "time_ns", lambda: (stamp - 60_000) * 1_000_000)
    behind = new_id("PR")
    assert behind[2:14] == ahead[2:14]
