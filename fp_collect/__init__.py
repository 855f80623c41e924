"""fp-collect: first-party analytics collection mounted inside your own web app."""

from fp_collect.collector import Collector
from fp_collect.config import CollectorConfig, Limits, Source, Workspace
from fp_collect.http import Request, Response
from fp_collect.restrictions import Restrictions
from fp_collect.store import Query, Store, open_store

__all__ = [
    "Collector",
    "CollectorConfig",
    "Limits",
    "Query",
    "Request",
    "Response",
    "Restrictions",
    "Source",
    "Store",
    "Workspace",
    "open_store",
]
__version__ = "0.1.0"
