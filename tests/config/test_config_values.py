"""Every option takes only values of its own type and range, from a file or a keyword:
a wrong one is a ConfigError naming the option, never read for its truthiness or left
to fail later, on a request."""

from __future__ import annotations

import gzip
import ipaddress
import json
import re
import textwrap
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from urllib.parse import quote

import pytest
from flask import Flask
from starlette.applications import Starlette
from starlette.testclient import TestClient
from werkzeug.test import Client

from fp_collect import Collector, CollectorConfig, Request, Source, Workspace
from fp_collect.adapters.asgi import CollectorMiddleware
from fp_collect.adapters.wsgi import CollectorMiddleware as WSGIMiddleware
from fp_collect.config import Limits
from fp_collect.errors import ConfigError
from fp_collect.restrictions import Restrictions
from fp_collect.rules import DropProperty

SOURCE = "[[sources]]\nwrite_key = 'site-key'\n"


def load(tmp_path: Path, text: str) -> CollectorConfig:
    path = tmp_path / "fp-collect.toml"
    path.write_text(textwrap.dedent(text))
    return CollectorConfig.from_file(path)


# -- booleans ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "option"),
    [
        (SOURCE + "enabled = 'false'", "Source.enabled"),
        (SOURCE + "enabled = 0", "Source.enabled"),
        (SOURCE + "strict_event_names = 'false'", "Source.strict_event_names"),
        ("record_unauthenticated = 'false'", "record_unauthenticated"),
        ("record_unauthenticated = 0", "record_unauthenticated"),
        (SOURCE + "restrictions = { confirmation_dedup = 'false' }", "confirmation_dedup"),
    ],
)
def test_a_switch_in_a_file_takes_only_true_or_false(
    tmp_path: Path, text: str, option: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(option) + " must be True or False"):
        load(tmp_path, text)


@pytest.mark.parametrize(
    ("make", "option"),
    [
        # Deliberately wrong types: what an untyped caller or a hand-built dict may pass.
        (lambda: Source(write_key="k", enabled="false"), "Source.enabled"),  # type: ignore[arg-type]
        (lambda: Source(write_key="k", enabled=None), "Source.enabled"),  # type: ignore[arg-type]
        (lambda: CollectorConfig(record_unauthenticated="no"), "record_unauthenticated"),  # type: ignore[arg-type]
        (lambda: CollectorConfig(record_unauthenticated=1), "record_unauthenticated"),  # type: ignore[arg-type]
    ],
)
def test_a_switch_as_a_keyword_takes_only_true_or_false(
    make: Callable[[], object], option: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(option) + " must be True or False"):
        make()


def test_a_source_switched_off_in_a_file_is_off(tmp_path: Path) -> None:
    config = load(tmp_path, "storage = 'memory://'\n" + SOURCE + "enabled = false\n")
    collector = Collector(config)
    body = b'{"event": "Page Viewed", "write_key": "site-key"}'
    route = collector.route("/events/track")
    assert route is not None
    answer = collector.handle(route, Request("POST", "/events/track", body=body))
    # The Firstparty API answers a bad key 200 with success false.
    assert json.loads(answer.body)["code"] == "invalid_write_key"


# -- numbers -------------------------------------------------------------------------


HUGE = "1" + "0" * 400  # an integer TOML reads, beyond any float


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "true", "'10'", "1e9", HUGE])
def test_commit_timeout_is_a_finite_positive_number_of_seconds(tmp_path: Path, value: str) -> None:
    """NaN made every write fail (a ValueError escaping a WSGI server as a 500) and
    infinity removed the deadline a request waits for its commit."""
    with pytest.raises(ConfigError, match="commit_timeout must be"):
        load(tmp_path, f"commit_timeout = {value}")


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "true", "'300'", "1e12", HUGE])
def test_max_future_seconds_is_a_finite_number_of_seconds(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="max_future_seconds must be"):
        load(tmp_path, f"max_future_seconds = {value}")


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-5", "true", "'1800'", "1e12", HUGE])
def test_session_timeout_is_a_finite_positive_number_of_seconds(tmp_path: Path, value: str) -> None:
    # true would have been one second: sessions cut after every pause.
    with pytest.raises(ConfigError, match=r"sources\[0\]: Source.session_timeout must be"):
        load(tmp_path, SOURCE + f"session_timeout = {value}")


@pytest.mark.parametrize("value", ["nan", "inf", "0", "true", "'600'", "1e12", HUGE])
def test_email_open_window_is_a_finite_positive_number_of_seconds(
    tmp_path: Path, value: str
) -> None:
    with pytest.raises(ConfigError, match="email_open_window must be"):
        load(tmp_path, SOURCE + f"restrictions = {{ email_open_window = {value} }}")


def test_numbers_in_range_and_false_for_off_are_taken(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        commit_timeout = 2.5
        max_future_seconds = 0
        [[sources]]
        write_key = 'site-key'
        session_timeout = 600
        restrictions = { email_open_window = false }
        [[sources]]
        write_key = 'app-key'
        session_timeout = false
        restrictions = { email_open_window = 60 }
        """,
    )
    site, app = config.sources
    assert (config.commit_timeout, config.max_future_seconds) == (2.5, 0)
    assert (site.session_timeout, app.session_timeout) == (600, None)
    assert (site.restrictions.email_open_window, app.restrictions.email_open_window) == (None, 60)


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda: CollectorConfig(commit_timeout=float("nan")), "commit_timeout"),
        (lambda: CollectorConfig(commit_timeout=float("inf")), "commit_timeout"),
        (lambda: CollectorConfig(commit_timeout=True), "commit_timeout"),
        (lambda: CollectorConfig(max_future_seconds=float("nan")), "max_future_seconds"),
        (lambda: CollectorConfig(max_future_seconds=float("inf")), "max_future_seconds"),
        (lambda: Source(write_key="k", session_timeout=float("inf")), "session_timeout"),
        (lambda: Source(write_key="k", session_timeout=True), "session_timeout"),
        (lambda: Restrictions(email_open_window=float("inf")), "email_open_window"),
        (lambda: Restrictions(email_open_window="600"), "email_open_window"),  # type: ignore[arg-type]
        (lambda: Restrictions(email_open_window=float("nan")), "email_open_window"),
        (lambda: Source(write_key="k", partial_success_status=200.0), "partial_success_status"),  # type: ignore[arg-type]
    ],
)
def test_numbers_as_keywords_are_finite_and_in_range(
    make: Callable[[], object], option: str
) -> None:
    with pytest.raises(ConfigError, match=option):
        make()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_batch_bytes", 0),
        ("max_batch_bytes", True),
        ("max_batch_bytes", 10**30),
        ("max_call_bytes", 2**40),
        ("max_depth", 100_000),
        ("max_message_id_length", 10_000),
        ("max_batch_events", 10**9),
        ("max_event_bytes", 15.5),
    ],
)
def test_limits_are_whole_numbers_in_range(tmp_path: Path, name: str, value: object) -> None:
    text = f"[limits]\n{name} = {str(value).lower()}"
    with pytest.raises(ConfigError, match=f"Limits.{name} must be a whole number from 1 to"):
        load(tmp_path, text)


def test_a_huge_body_limit_cannot_turn_a_gzipped_request_into_a_server_error() -> None:
    """Why the byte limits have a ceiling: the decompression limit is a C ssize_t."""
    with pytest.raises(ConfigError, match="max_call_bytes"):
        Limits(max_call_bytes=10**30)
    collector = Collector(
        CollectorConfig(
            sources=[Source(write_key="k")],
            storage="memory://",
            limits=Limits(max_call_bytes=2**30),  # the ceiling: 1 GiB
        )
    )
    body = gzip.compress(b'{"event": "Page Viewed", "write_key": "k"}')
    route = collector.route("/events/track")
    assert route is not None
    request = Request("POST", "/events/track", body=body, headers={"content-encoding": "gzip"})
    assert json.loads(collector.handle(route, request).body)["success"] is True


# -- values that could never work ----------------------------------------------------


@pytest.mark.parametrize(
    "prefix",
    ["/my%20app", "/a?b", "/a#b", "/café", "/a/../collect", "/./collect", "/a\tb", "/a//b"],
)
def test_a_prefix_no_request_path_can_match_is_refused(prefix: str) -> None:
    """Routes are matched against the decoded path: these would never be reached."""
    with pytest.raises(ConfigError, match="must be a plain path"):
        CollectorConfig(prefix=prefix)


def test_a_prefix_of_path_characters_is_taken_and_routes() -> None:
    config = CollectorConfig(
        sources=[Source(write_key="k")], storage="memory://", prefix="collect/v2~a_b-c.d/"
    )
    assert config.prefix == "/collect/v2~a_b-c.d"
    assert Collector(config).route("/collect/v2~a_b-c.d/events/track") is not None


@pytest.mark.parametrize("prefix", ["/my collect", "/{t}", "/a|b"])
def test_a_prefix_a_client_must_escape_routes_under_both_adapters(prefix: str) -> None:
    """Written as the server decodes it: a client sends "/my%20collect/...", and both
    WSGI and ASGI servers hand the app "/my collect/..."."""
    body = {"writeKey": "k", "type": "track", "userId": "u", "event": "Signed Up"}
    escaped = quote(prefix) + "/v1/track"
    collector = Collector(sources=[Source(write_key="k")], storage="memory://", prefix=prefix)
    asgi = TestClient(CollectorMiddleware(Starlette(), collector=collector))
    assert asgi.post(escaped, json=body).status_code == 200
    wsgi = Client(WSGIMiddleware(Flask(__name__).wsgi_app, collector=collector))
    assert wsgi.post(escaped, json=body).status_code == 200
    assert len(list(collector.store.events())) == 2


@pytest.mark.parametrize(
    "token",
    [
        " a-read-token-of-16+-characters",
        "a-read-token-of-16+-characters\n",
        " " * 20,
        "a-read-tōken-of-16+-characters",
        "a-read-token\x00of-16+-characters",
    ],
)
def test_a_read_token_no_header_could_carry_is_refused_without_showing_it(token: str) -> None:
    with pytest.raises(ConfigError, match=r"read_tokens\[0\] must be printable ASCII") as raised:
        CollectorConfig(read_tokens=[token])
    assert "read-t" not in str(raised.value)  # the secret is not shown


def test_a_read_token_with_an_inner_space_is_a_token() -> None:
    assert CollectorConfig(read_tokens=["two words, 16+ characters"]).read_tokens == (
        "two words, 16+ characters",
    )


def test_trusted_proxies_are_text_or_ipaddress_objects_never_numbers() -> None:
    # ipaddress reads the int 10 as 0.0.0.10: never the 10.0.0.0/8 meant.
    with pytest.raises(ConfigError, match="trusted proxy 10 must be a string"):
        CollectorConfig(trusted_proxies=[10])  # type: ignore[list-item]
    # ipaddress objects still work, as before, though the type hints only name strings.
    proxies = ["10.0.0.0/8", ipaddress.ip_address("::1")]
    config = CollectorConfig(trusted_proxies=proxies)  # type: ignore[arg-type]
    assert [str(n) for n in config.proxy_networks()] == ["10.0.0.0/8", "::1/128"]


def test_a_source_id_and_names_are_strings() -> None:
    with pytest.raises(ConfigError, match=r"Source\.id must be a string, not int"):
        Source(write_key="k", id=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"Source\.name must be a string, not int"):
        Source(write_key="k", name=7)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"Workspace\.name must be a string, not int"):
        Workspace("w", name=5)  # type: ignore[arg-type]


def test_none_for_an_id_or_a_name_means_not_given() -> None:
    """As "" does: id=os.environ.get("SOURCE_ID") keeps working without the variable."""
    derived = Source(write_key="k").id
    assert derived.startswith("src_")
    assert Source(write_key="k", id=None, name=None).id == derived  # type: ignore[arg-type]
    assert Source(write_key="k", name=None).name == ""  # type: ignore[arg-type]
    assert Workspace("w", name=None).name == ""  # type: ignore[arg-type]


def test_partial_success_status_may_be_an_http_status() -> None:
    source = Source(write_key="k", partial_success_status=HTTPStatus.OK)
    assert source.partial_success_status == 200
    assert type(source.partial_success_status) is int
    with pytest.raises(ConfigError, match="partial_success_status"):
        Source(write_key="k", partial_success_status=True)


def test_the_deepest_nesting_allowed_passes_a_rule_under_asgi() -> None:
    """max_depth may be raised to 256, and an event that deep still goes through the
    rules (which copy it recursively) and the ASGI stack: at 512 it was a RecursionError,
    recorded as internal_error."""
    with pytest.raises(ConfigError, match="max_depth"):
        Limits(max_depth=257)
    source = Source(write_key="k", rules=[DropProperty("gone")])
    collector = Collector(sources=[source], storage="memory://", limits=Limits(max_depth=256))
    deep: object = "bottom"
    for _ in range(254):  # the event and its properties are two levels more
        deep = {"d": deep}
    body = {"writeKey": "k", "type": "track", "userId": "u", "event": "Deep",
            "properties": {"deep": deep, "gone": 1}}  # fmt: skip
    client = TestClient(CollectorMiddleware(Starlette(), collector=collector))
    response = client.post("/v1/track", content=json.dumps(body))
    assert response.status_code == 200, response.text
    [stored] = collector.store.events()
    assert "gone" not in json.loads(stored.payload)["properties"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: CollectorConfig(commit_timeout=10**5000),
        lambda: Limits(max_depth=10**5000),
        lambda: Source(write_key="k", session_timeout=10**5000),
    ],
)
def test_an_absurdly_long_integer_is_described_not_written_out(make: Callable[[], object]) -> None:
    """Python refuses to write out an integer of more than 4,300 digits: the message gives
    its size instead of failing with a ValueError of its own."""
    with pytest.raises(ConfigError, match="got an integer of 16610 bits"):
        make()
