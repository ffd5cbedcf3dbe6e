"""Where a webhook delivery may go. Endpoints are the tenants' URLs, called from inside the
deployment's network: loopback, private, link-local (cloud metadata) and other non-public
addresses are refused unless the operator allows them (`webhooks.private_hosts`), both for
an address in the URL and for every address a name resolves to (checked as aiohttp connects,
so a name cannot change its answer between a check and the call)."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver


def public_address(text: str) -> bool:
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global


def refused_address(url: str) -> str | None:
    """Why a URL that names an address may not be called, or None (names are left to
    :class:`PublicResolver`)."""
    host = urlsplit(url).hostname or ""
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
