"""Every option takes only values of its own type and range, from a file or a keyword:
a wrong one is a ConfigError naming the option, never read for its truthiness or left
to fail later, on a request."""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from fp_collect import Collector, CollectorConfig, Request, Source
from fp_collect.errors import ConfigError

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
