"""Every key name the store uses, and the cells (key, field) a plan reads or checks."""

from __future__ import annotations

import json

from fp_collect.store.base import Identity

# A value a plan read: (kind, key, field) -> what it saw. Kinds are the script's checks:
# "h" a hash field, "hx" whether a hash field exists, "g" a string key.
Cell = tuple[str, str, str]
Check = tuple[str, str, str, str | None]
Write = tuple[str, tuple[str, ...], tuple[str, ...]]


class Keys:
    """Every key name, in one place (see the module docstring)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.rejections = prefix + "rejections"
        self.event_ids = prefix + "ids:events"
        self.rejection_ids = prefix + "ids:rejections"
        self.sources = prefix + "sources"

    def events(self, source_id: str) -> str:
        return f"{self.prefix}events:{source_id}"

    def messages(self, source_id: str) -> str:
        return f"{self.prefix}messages:{source_id}"

    def claim(self, source_id: str, kind: str, key: str) -> str:
        # JSON keeps the three parts apart whatever characters they hold.
        return f"{self.prefix}claim:{compact_json([source_id, kind, key])}"

    def identities(self, scope: str) -> str:
        return f"{self.prefix}identities:{scope}"

    def profile(self, profile_id: str) -> str:
        return f"{self.prefix}profile:{profile_id}"

    def profile_identities(self, profile_id: str) -> str:
        return f"{self.prefix}profile-identities:{profile_id}"

    def profile_sessions(self, profile_id: str) -> str:
        return f"{self.prefix}profile-sessions:{profile_id}"

    def session(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"


def compact_json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def identity_field(identity: Identity) -> str:
    # Identity kinds are fixed words (user_id, anonymous_id, email): the first ":" splits.
    return f"{identity.kind}:{identity.value}"


def identity_member(scope: str, identity: Identity) -> str:
    return compact_json([scope, identity.kind, identity.value])


def session_cells(keys: Keys, session_id: str) -> list[Cell]:
    key = keys.session(session_id)
    return [("h", key, "profile_id"), ("h", key, "last_seen")]


def profile_cells(keys: Keys, profile_id: str) -> list[Cell]:
    key = keys.profile(profile_id)
    return [("h", key, "created_at"), ("h", key, "merged_into")]
