"""Client addresses as budget keys: one spelling per address, one key per IPv6 /64."""

from __future__ import annotations

import ipaddress
from functools import lru_cache


@lru_cache(maxsize=4096)
def canonical_address(spelling: str) -> str | None:
    """An address as a budget key, or None if it is none.

    Brackets, a port and a zone id are dropped; an IPv4-mapped IPv6 address is its IPv4 address;
    any other IPv6 address stands for its /64, the block one home or phone is given.
    """
    text = spelling.strip()
    if text.startswith("["):
        text, bracket, _ = text[1:].partition("]")
        if not bracket:
            return None
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.partition(":")[0]
    text = text.partition("%")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
