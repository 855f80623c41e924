"""``fp-collect events`` and ``fp-collect rejections`` on a real SQLite store."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from fp_collect import open_store
from fp_collect.store import Query

# Run fp-collect in-process (the cli fixture); returns status, out, err, lines, objects.
CLIResult = Any
RunCLI = Callable[..., CLIResult]
# When the store_url fixture's two batches were received.
EARLY = "2024-05-01T10:00:00.000Z"
LATE = "2024-05-01T12:00:00.000Z"


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"  # an absolute path, hence four slashes


REJECTION_KEYS = [
    "id",
    "source_id",
    "reason",
    "message",
    "received_at",
    "endpoint",
    "index",
    "message_id",
    "payload",
]


def stored_payloads(url: str, query: Query = Query()) -> list[str]:
    with open_store(url) as store:
        return [event.payload for event in store.events(query)]


def message_ids(result: CLIResult) -> list[object]:
    return [obj["messageId"] for obj in result.objects]


# -- events -------------------------------------------------------------------------------


def test_events_prints_each_stored_payload_exactly(cli: RunCLI, store_url: str) -> None:
    result = cli(["events", "--storage", store_url])
    assert (result.status, result.err) == (0, "")
    payloads = stored_payloads(store_url)
    assert len(payloads) == 4
    assert result.out == "".join(p + "\n" for p in payloads)
    assert message_ids(result) == ["m1", "m2", "m3", "m4"]
    assert result.objects[0]["properties"] == {"é": 1}  # UTF-8, not escaped


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--source", "site-a"], ["m1", "m2"]),
        (["--source", "site-b"], ["m3", "m4"]),
        (["--source", "nobody"], []),
        (["--type", "track"], ["m1", "m3"]),
        (["--type", "identify"], ["m4"]),
        (["--source", "site-b", "--type", "track"], ["m3"]),
        (["--limit", "2"], ["m1", "m2"]),
        (["--limit", "0"], []),
        (["--since", LATE], ["m4"]),
        # 13:30 at +02:00 is 11:30 UTC: between the two batches
        (["--since", "2024-05-01T13:30:00+02:00"], ["m4"]),
        (["--since", "2024-05-01T07:00:00-03:00"], ["m1", "m2", "m3", "m4"]),
        (["--since", "2024-05-01"], ["m1", "m2", "m3", "m4"]),
        (["--since", "2024-05-02"], []),
        (["--since", "2024-05-01T11:59:59.9999Z"], ["m4"]),
        (["--type", "track", "--limit", "1"], ["m1"]),
    ],
)
def test_events_filters(cli: RunCLI, store_url: str, args: list[str], expected: list[str]) -> None:
    result = cli(["events", "--storage", store_url, *args])
    assert (result.status, result.err) == (0, "")
    assert message_ids(result) == expected


def test_since_compares_with_received_at(cli: RunCLI, store_url: str) -> None:
    result = cli(["events", "--storage", store_url, "--since", "2024-05-01T12:00:00+00:00"])
    assert [obj["receivedAt"] for obj in result.objects] == [LATE]
    result = cli(["events", "--storage", store_url, "--since", "2024-05-01T10:00:00.001Z"])
    assert [obj["receivedAt"] for obj in result.objects] == [LATE]
    result = cli(["events", "--storage", store_url, "--since", EARLY])
    assert len(result.lines) == 4


def test_options_come_from_the_environment(cli: RunCLI, store_url: str) -> None:
    env = {
        "FP_COLLECT_STORAGE": store_url,
        "FP_COLLECT_SOURCE": "site-a",
        "FP_COLLECT_TYPE": "page",
    }
    assert message_ids(cli(["events"], env=env)) == ["m2"]
    env = {"FP_COLLECT_STORAGE": store_url, "FP_COLLECT_SINCE": "2024-05-01T11:00Z"}
    assert message_ids(cli(["events"], env=env)) == ["m4"]
    assert message_ids(
        cli(["events"], env={"FP_COLLECT_STORAGE": store_url, "FP_COLLECT_LIMIT": "1"})
    ) == ["m1"]


def test_a_flag_wins_over_its_environment_variable(
    cli: RunCLI, store_url: str, tmp_path: Path
) -> None:
    env = {"FP_COLLECT_STORAGE": sqlite_url(tmp_path / "missing.db"), "FP_COLLECT_TYPE": "page"}
    result = cli(["events", "--storage", store_url, "--type", "identify"], env=env)
    assert message_ids(result) == ["m4"]


def test_default_storage_is_fp_collect_db_in_the_current_directory(
    cli: RunCLI, store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    missing = cli(["events"])
    assert missing.status == 2
    assert str(tmp_path / "fp_collect.db") in missing.err
    os.rename(tmp_path / "e.db", tmp_path / "fp_collect.db")
    assert message_ids(cli(["events"])) == ["m1", "m2", "m3", "m4"]


# -- rejections ---------------------------------------------------------------------------


def test_rejections_prints_one_object_per_rejection(cli: RunCLI, store_url: str) -> None:
    result = cli(["rejections", "--storage", store_url])
    assert (result.status, result.err) == (0, "")
    objects = result.objects
    assert [list(obj) for obj in objects] == [REJECTION_KEYS] * 3
    with open_store(store_url) as store:
        stored = list(store.rejections())
    assert objects == [
        {
            "id": r.id,
            "source_id": r.source_id,
            "reason": r.reason,
            "message": r.message,
            "received_at": r.received_at,
            "endpoint": r.endpoint,
            "index": r.index,
            "message_id": r.message_id,
            "payload": r.payload,
        }
        for r in stored
    ]
    reasons = [(obj["source_id"], obj["reason"]) for obj in objects]
    assert reasons == [
        (None, "invalid_write_key"),
        ("site-a", "missing_event"),
        ("site-a", "duplicate_message_id"),
    ]
    assert json.loads(str(objects[0]["payload"])) == {"userId": "u9", "event": "X"}
    assert objects[0]["endpoint"] == "/v1/track"
    assert objects[2]["message_id"] == "m1"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--reason", "missing_event"], ["missing_event"]),
        (["--type", "invalid_write_key"], ["invalid_write_key"]),  # --type is an alias
        (["--source", "site-a"], ["missing_event", "duplicate_message_id"]),
        (["--since", "2024-05-01T12:00:00+00:00"], ["duplicate_message_id"]),
        (["--limit", "1"], ["invalid_write_key"]),
        (["--source", "site-b"], []),
    ],
)
def test_rejections_filters(
    cli: RunCLI, store_url: str, args: list[str], expected: list[str]
) -> None:
    result = cli(["rejections", "--storage", store_url, *args])
    assert (result.status, result.err) == (0, "")
    assert [obj["reason"] for obj in result.objects] == expected


def test_rejections_reason_from_the_environment(cli: RunCLI, store_url: str) -> None:
    env = {"FP_COLLECT_STORAGE": store_url, "FP_COLLECT_REASON": "duplicate_message_id"}
    result = cli(["rejections"], env=env)
    assert [obj["received_at"] for obj in result.objects] == [LATE]


# -- errors: one line on stderr, exit 2, nothing created ------------------------------------


def assert_usage_error(result: CLIResult, *fragments: str) -> None:
    assert result.status == 2
    assert result.out == ""
    assert "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1, result.err
    for fragment in fragments:
        assert fragment in result.err


@pytest.mark.parametrize("command", ["events", "rejections"])
@pytest.mark.parametrize(
    ("since", "env"),
    [
        ("yesterday", False),
        ("2024-13-01", False),
        ("2024-05-01T25:00:00Z", False),
        ("2024-05-01T10:00:00+99:00", False),
        ("0001-01-01T00:00:00+01:00", False),  # before year 1 in UTC
        ("tomorrow", True),
    ],
)
def test_bad_since_is_a_clear_error(
    cli: RunCLI, store_url: str, command: str, since: str, env: bool
) -> None:
    if env:
        result = cli([command, "--storage", store_url], env={"FP_COLLECT_SINCE": since})
        assert_usage_error(result, "FP_COLLECT_SINCE", repr(since), "ISO-8601")
    else:
        result = cli([command, "--storage", store_url, "--since", since])
        assert_usage_error(result, "--since", repr(since), "ISO-8601")


@pytest.mark.parametrize(
    ("argv", "env", "fragments"),
    [
        (["--storage", "redis+x://h/0"], {}, ["unknown storage scheme", "redis+x"]),
        (["--storage", "events.db"], {}, ["no scheme", "sqlite:///events.db"]),
        (["--storage", "memory://"], {}, ["memory://", "nothing between processes"]),
        (["--limit", "-1"], {}, ["--limit", "'-1'"]),
        (["--limit", "ten"], {}, ["--limit", "'ten'"]),
        ([], {"FP_COLLECT_LIMIT": "ten"}, ["FP_COLLECT_LIMIT", "'ten'"]),
        ([], {"FP_COLLECT_STORAGE": "nowhere"}, ["no scheme"]),
        (["--no-such-flag"], {}, ["unrecognized arguments", "--no-such-flag"]),
    ],
)
def test_usage_errors(
    cli: RunCLI, argv: Sequence[str], env: Mapping[str, str], fragments: list[str]
) -> None:
    assert_usage_error(cli(["events", *argv], env=env), *fragments)


@pytest.mark.parametrize("command", ["events", "rejections"])
def test_a_missing_sqlite_file_is_reported_and_not_created(
    cli: RunCLI, tmp_path: Path, command: str
) -> None:
    path = tmp_path / "nothing-here.db"
    result = cli([command, "--storage", sqlite_url(path)])
    assert_usage_error(result, str(path), "does not exist")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["events", "rejections"])
def test_a_postgresql_schema_without_our_tables_is_reported_and_not_created(
    cli: RunCLI, postgres_dsn: str, command: str
) -> None:
    """A mistyped ``schema=`` must not leave a new, empty schema in the site's database."""
    import psycopg

    schema = f"fpc_test_typo_{uuid.uuid4().hex[:12]}"
    separator = "&" if "?" in postgres_dsn else "?"
    try:
        result = cli([command, "--storage", f"{postgres_dsn}{separator}schema={schema}"])
        assert_usage_error(result, schema, "no fp-collect tables", "nothing was changed")
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
            assert found.fetchone() is None
    finally:  # the shared server: leave nothing behind, even when this fails
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_a_relative_url_that_meant_an_absolute_path_gets_a_hint(
    cli: RunCLI, store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    three_slashes = store_url.replace("sqlite:////", "sqlite:///")
    result = cli(["events", "--storage", three_slashes])
    assert_usage_error(result, "does not exist", f"use {store_url}")
    assert list(elsewhere.iterdir()) == []


def test_a_directory_or_a_non_database_file_is_an_error(cli: RunCLI, tmp_path: Path) -> None:
    assert_usage_error(cli(["events", "--storage", sqlite_url(tmp_path)]), "is a directory")
    junk = tmp_path / "junk.db"
    junk.write_text("not a database\n" * 100)
    assert_usage_error(cli(["events", "--storage", sqlite_url(junk)]), "not a database")


def test_no_command_prints_help_and_exits_2(cli: RunCLI) -> None:
    result = cli([])
    assert result.status == 2
    assert "serve" in result.err and "events" in result.err and "rejections" in result.err


@pytest.mark.parametrize("command", [[], ["serve"], ["events"], ["rejections"]])
def test_help(cli: RunCLI, command: list[str]) -> None:
    result = cli([*command, "--help"])
    assert result.status == 0
    assert result.out.startswith("usage: fp-collect")
    if command:
        assert "FP_COLLECT_STORAGE" in result.out
        assert "examples:" in result.out
    if command == ["rejections"]:
        assert "--reason REASON, --type REASON" in result.out


@pytest.mark.parametrize("page_size", [1, 2, 3])
@pytest.mark.parametrize(
    "args",
    [
        ["events"],
        ["events", "--limit", "3"],
        ["events", "--limit", "2"],
        ["events", "--source", "site-b", "--limit", "5"],
        ["rejections"],
        ["rejections", "--limit", "2"],
    ],
)
def test_reading_page_by_page_changes_nothing(
    cli: RunCLI, store_url: str, monkeypatch: pytest.MonkeyPatch, page_size: int, args: list[str]
) -> None:
    whole = cli([*args, "--storage", store_url])
    monkeypatch.setattr("fp_collect.cli.PAGE_SIZE", page_size)
    paged = cli([*args, "--storage", store_url])
    assert (paged.status, paged.out) == (0, whole.out)
    assert whole.lines


def test_flagged_comes_from_the_environment_too(
    cli: RunCLI, store_url: str, tmp_path: Path
) -> None:
    flagged = cli(["events", "--storage", store_url, "--flagged"])
    assert flagged.status == 0 and flagged.objects, "the fixture stores a flagged event"
    assert all(obj["warnings"] for obj in flagged.objects)
    for on in ("1", "true", "Yes", " on "):
        assert (
            cli(["events"], env={"FP_COLLECT_STORAGE": store_url, "FP_COLLECT_FLAGGED": on}).out
            == flagged.out
        )
    everything = cli(["events", "--storage", store_url])
    assert len(everything.objects) > len(flagged.objects)
    for off in ("0", "false", "no", ""):
        result = cli(["events"], env={"FP_COLLECT_STORAGE": store_url, "FP_COLLECT_FLAGGED": off})
        assert result.out == everything.out
    # The option wins, either way.
    env_on = {"FP_COLLECT_STORAGE": store_url, "FP_COLLECT_FLAGGED": "1"}
    assert cli(["events", "--no-flagged"], env=env_on).out == everything.out
    env_off = {"FP_COLLECT_STORAGE": store_url, "FP_COLLECT_FLAGGED": "0"}
    assert cli(["events", "--flagged"], env=env_off).out == flagged.out
    wrong = cli(["events"], env={"FP_COLLECT_STORAGE": store_url, "FP_COLLECT_FLAGGED": "maybe"})
    assert wrong.status == 2
    assert "FP_COLLECT_FLAGGED='maybe'" in wrong.err and "true or false" in wrong.err
