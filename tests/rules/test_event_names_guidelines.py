"""Event-name guidelines (seed 002) and the per-source policy that applies them."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fp_collect.errors import ConfigError
from fp_collect.event_names import EventNamePolicy, NameVerdict, check_event_name


def problems_about(name: str, *topics: str) -> None:
    """Every problem found mentions one of ``topics``, and every topic is found."""
    problems = check_event_name(name)
    for topic in topics:
        assert any(topic in problem for problem in problems), (topic, problems)
    for problem in problems:
        assert any(topic in problem for topic in topics), (problem, topics)


# -- the seed's own examples --------------------------------------------------------------


@pytest.mark.parametrize("name", ["Page Viewed", "Form Submitted", "Button Clicked"])
def test_the_seed_examples_of_good_names_conform(name: str) -> None:
    assert check_event_name(name) == []


def test_form_submitted_is_not_title_cased() -> None:
    assert check_event_name("form submitted") == ["Not Title Case: write 'Form Submitted'."]


def test_button_clicked_is_not_title_cased() -> None:
    assert check_event_name("Button clicked") == ["Not Title Case: write 'Button Clicked'."]


def test_product_126_uses_numbers() -> None:
    problems_about("Product 126", "numbers", "noun and a past-tense verb")


def test_cart_abandoned_uses_special_characters() -> None:
    assert check_event_name("Cart-Abandoned") == [
        "Contains special characters ('-'): use A-Z and single spaces only."
    ]


# -- each guideline -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Agent Assigned",
        "Order Completed",
        "User Logged In",
        "Account Signed Up",
        "Password Reset",
        "Invoice Sent",
        "Report Built",
        "Plan Bought",
        "Invoice Paid",
        "Article Read",
        "Video Seen",
        "Product List Filtered",
        "A B Tested",
    ],
)
def test_conforming_names(name: str) -> None:
    assert check_event_name(name) == []


@pytest.mark.parametrize(
    ("name", "topics"),
    [
        ("", ("empty",)),
        ("Viewed", ("noun and a past-tense verb",)),
        ("Newsletter Signup", ("past-tense verb ('Signup')",)),
        ("Page  Viewed", ("more than one space",)),
        (" Page Viewed", ("Starts or ends",)),
        ("Page Viewed ", ("Starts or ends",)),
        ("Page\tViewed", ("special characters ('\\t')",)),
        ("Page_Viewed", ("special characters ('_')",)),
        ("Página Vista", ("special characters ('á')", "past-tense verb ('Vista')")),
        ("PAGE VIEWED", ("Not Title Case: write 'Page Viewed'",)),
        ("URL Opened", ("Not Title Case: write 'Url Opened'",)),
        ("pageViewed", ("Not Title Case: write 'Page Viewed'", "noun and a past-tense verb")),
        ("Order Completed 2", ("numbers ('2')",)),
        ("Order 2 Cancel", ("numbers ('2')", "past-tense verb ('Cancel')")),
        ("!!!", ("special characters ('!')", "noun and a past-tense verb")),
    ],
)
def test_each_guideline_is_reported(name: str, topics: tuple[str, ...]) -> None:
    problems_about(name, *topics)


def test_results_are_fresh_lists_despite_the_cache() -> None:
    check_event_name("form submitted").append("scribbled on")
    assert check_event_name("form submitted") == ["Not Title Case: write 'Form Submitted'."]


def test_long_names_are_checked_the_same_way_uncached() -> None:
    long_name = " ".join(["Thing"] * 60) + " Viewed"
    assert len(long_name) > 300
    assert check_event_name(long_name) == []
    assert check_event_name(long_name.lower()) != []
    assert EventNamePolicy(strict=True).evaluate(long_name.lower()).reject


# -- properties -----------------------------------------------------------------------

title_case_ed_words = st.from_regex(r"[A-Z][a-z]{0,8}ed", fullmatch=True)


@given(st.lists(title_case_ed_words, min_size=2, max_size=6))
def test_title_case_past_tense_words_with_single_spaces_conform(words: list[str]) -> None:
    assert check_event_name(" ".join(words)) == []


@given(st.text(max_size=30), st.sampled_from("0123456789"), st.text(max_size=30))
@example("Order Completed ", "1", "")
def test_a_name_with_a_digit_never_conforms(before: str, digit: str, after: str) -> None:
    name = before + digit + after
    problems = check_event_name(name)
    assert any(problem.startswith("Contains numbers") for problem in problems)


names = st.text(max_size=40) | st.lists(
    st.from_regex(r"[A-Za-z]{1,8}", fullmatch=True), max_size=4
).map(" ".join)


@given(names)
@example("Page Viewed")
@example("Cart-Abandoned")
@example("\ud800 Sent")
def test_strict_policy_rejects_exactly_the_non_conforming(name: str) -> None:
    problems = tuple(check_event_name(name))
    lenient, strict = EventNamePolicy().evaluate(name), EventNamePolicy(strict=True).evaluate(name)

    assert lenient == NameVerdict(ok=not problems, warnings=problems, reject=False)
    assert strict == NameVerdict(ok=not problems, warnings=problems, reject=bool(problems))


def test_strict_must_be_a_bool() -> None:
    with pytest.raises(ConfigError):
        EventNamePolicy(strict="yes")  # type: ignore[arg-type]
