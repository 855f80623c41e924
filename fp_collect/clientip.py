"""Which address a request really came from.

``X-Forwarded-For`` is only believed when the peer is a configured trusted proxy;
anyone else could write whatever they like into it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from fp_collect.config import IPNetwork


class ClientAddress:
    def __init__(self, trusted_proxies: tuple[IPNetwork, ...]) -> None:
        self._trusted = trusted_proxies

    def resolve(self, peer: str | None, headers: Mapping[str, str]) -> str | None:
        """The client address: the peer, or, behind trusted proxies, the right-most
        ``X-Forwarded-For`` entry that is not itself a trusted proxy."""
        if not self._trusted or peer is None or not self._is_trusted(peer):
            return peer
        forwarded = headers.get("x-forwarded-for")
        if not forwarded:
            return peer
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not _is_address(hop):
                # A malformed hop means the chain cannot be trusted past this point.
                return peer
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else peer

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
