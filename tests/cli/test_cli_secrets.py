"""Storage passwords and read tokens are never shown: not in the dev server's banner,
not in an error message, not in a configuration's repr."""

from __future__ import annotations

import pytest

from fp_collect import CollectorConfig, Source
from fp_collect.cli import main as cli
from fp_collect.errors import ConfigError
from fp_collect.store import hide_secrets, open_store, redact
from fp_collect.store.memory import MemoryStore

PASSWORD = "S3cretPW"
TOKEN = "a-read-token-of-16+-characters"


def test_the_dev_server_banner_hides_the_storage_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing is served nor connected to: only the banner is looked at.
    monkeypatch.setattr("fp_collect.collector.open_store", lambda url: MemoryStore())
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: None)
    url = f"postgresql://app:{PASSWORD}@db.internal/events?password={PASSWORD}"
    assert cli(["serve", "--storage", url, "--write-key", "site-key"], environ={}) == 0
    out = capsys.readouterr().out
    assert PASSWORD not in out
    shown = "postgresql://app:***@db.internal/events?password=***"
    assert f"storage:    {shown}" in out
    assert out.count(shown) == 3  # the storage line and both "Try:" lines


@pytest.mark.parametrize(
    "url",
    [
        f"postgresq://app:{PASSWORD}@db.internal/x",
        f"postgresql:app:{PASSWORD}@db.internal/x",
        f"postgresql://app:{PASSWORD}@[db.internal/x",
        f"sqlite:///x.db?password={PASSWORD}",
    ],
)
def test_a_bad_storage_url_is_reported_without_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        open_store(url)
    assert PASSWORD not in str(raised.value)
    with pytest.raises(ConfigError) as raised:
        CollectorConfig(storage=url.replace("://", ":"))
    assert PASSWORD not in str(raised.value)


def test_the_unknown_scheme_is_still_named() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown storage scheme 'postgresq' in 'postgresq://app:\*\*\*@db/x'"
    ):
        open_store(f"postgresq://app:{PASSWORD}@db/x")


def test_a_configuration_repr_hides_read_tokens_and_the_storage_password() -> None:
    config = CollectorConfig(
        sources=[Source(write_key="site-key")],
        storage=f"sqlite:///x.db?password={PASSWORD}",
        read_tokens=[TOKEN],
    )
    text = repr(config)
    assert TOKEN not in text and PASSWORD not in text
    # What is not secret is still there to debug with; write keys are public.
    assert "site-key" in text and "read_tokens=<1 hidden>" in text
    assert "storage='sqlite:///x.db?password=***'" in text


def test_postgres_options_repr_hides_the_password() -> None:
    from fp_collect.store.postgres.options import parse_url  # psycopg: a dev dependency

    options = parse_url(f"postgresql://app:{PASSWORD}@db.internal/x?schema=s")
    assert PASSWORD not in repr(options) and "app:***@db.internal" in repr(options)
    assert PASSWORD in options.conninfo  # psycopg still gets it


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("postgresql://u:p@ss:w@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql://u@h/db?sslmode=require&sslpassword=x",
            "postgresql://u@h/db?sslmode=require&sslpassword=***",
        ),
        ("sqlite:////tmp/a:b@c.db", "sqlite:////tmp/a:b@c.db"),
        ("memory://", "memory://"),
        # A password with a raw "/", "?" or "#" (it should be %-escaped) ends the host
        # part early; it is hidden all the same. An IPv6 host is not a user.
        ("postgresql://u:pa/ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:pa?ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:pa#ss@h/db?password=x", "postgresql://u:***@h/db?password=***"),
        ("postgresql://[::1]:5432/db?x=a@b", "postgresql://[::1]:5432/db?x=a@b"),
        # libpq reads an option up to the next "&", "#" included; after "?" there is no port.
        ("postgresql://u@h/db?password=ab#cd", "postgresql://u@h/db?password=***"),
        ("postgresql://app:2024?Secret@db/events", "postgresql://app:***@db/events"),
        ("postgresql://h:5432/db", "postgresql://h:5432/db"),
    ],
)
def test_redact_hides_passwords_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact(url) == shown


@pytest.mark.parametrize(
    "password", ["s3c%zzret", "s3c ret", "p%2Fw%zz"], ids=["bad-escape", "space", "escaped"]
)
def test_libpq_quoting_a_bad_password_does_not_show_it(password: str) -> None:
    """libpq quotes the part of a URL it cannot read, which may be the password."""
    from fp_collect.store.postgres.options import parse_url  # psycopg: a dev dependency

    with pytest.raises(ConfigError) as raised:
        parse_url(f"postgresql://app:{password}@db.internal/x")
    message = str(raised.value)
    assert password not in message and "***" in message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:s3cr/etPART2@db/ev%zz",
        "postgresql://app:s3cr et/PART2@db/events",
        "postgresql://app:s3cr%zz@db/events",
        "redis://:s3cret/x@localhost:6379/0",
        "redis://:s3c?ret@localhost:6379/0",
    ],
)
def test_a_password_a_url_cannot_carry_as_it_is_is_refused_unseen(url: str) -> None:
    """Drivers split such a password and quote a piece of it, which nothing could hide:
    it is refused before any driver sees it, and the message names no value."""
    with pytest.raises(ConfigError, match="password must be %-escaped") as raised:
        open_store(url)
    assert "s3c" not in str(raised.value) and "PART2" not in str(raised.value)


def test_a_short_password_is_hidden_only_where_quoted() -> None:
    url = "postgresql://app:a%zz@db/x"
    shown = hide_secrets('invalid percent-encoded token: "a%zz" in a URL', url)
    assert shown == 'invalid percent-encoded token: "***" in a URL'


def test_a_malformed_redis_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="is malformed") as raised:
        open_store(f"redis://u:{PASSWORD}@[::1/0")
    assert PASSWORD not in str(raised.value)
