"""Where a webhook delivery may go. Endpoints are the tenants' URLs, called from inside the
deployment's network: loopback, private, link-local (cloud metadata) and other non-public
addresses are refused unless the operator allows them (`webhooks.private_hosts`), both for
an address in the URL and for every address a name resolves to (checked as aiohttp connects,
so a name cannot change its answer between a check and the call)."""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

# IPv6 ranges that carry an IPv4 address to a gateway (NAT64): the address is where it goes.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def public_address(text: str) -> bool:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64:
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        else:
            address = address.ipv4_mapped or address.sixtofour or address
    return address.is_global


def refused_address(url: str) -> str | None:
    """Why a URL that names an address may not be called, or None (names are left to
    :class:`PublicResolver`)."""
    try:
        # The host as aiohttp will connect to it: yarl folds full-width digits and dots
        # (`１２７．０．０．１`) to ASCII, which it then takes for an address, not a name.
        host = URL(url).host or ""
    except ValueError:
        return "the endpoint's URL cannot be read"
    try:
        allowed = public_address(host)
    except ValueError:
        return None  # a name
    return None if allowed else f"the endpoint's address {host} is not a public address"


class PublicResolver(AbstractResolver):
    """Resolves as aiohttp does, keeping public addresses only."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = [r for r in await self._inner.resolve(host, port, family) if public_address(r["host"])]  # fmt: skip
        if not found:
            raise OSError(f"{host} resolves to no public address")
        return found

    async def close(self) -> None:
        await self._inner.close()
