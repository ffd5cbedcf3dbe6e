"""Where a webhook delivery may go (projections/webhook_hosts.py): a tenant's URL must not
reach into the deployment's own network, whether it names an address or a host."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp.abc import ResolveResult

from projections.webhook_hosts import PublicResolver, public_address, refused_address


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.215.14", True),
        ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.9", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),  # an IPv4 loopback in IPv6 clothing
        ("0.0.0.0", False),
        ("64:ff9b::a00:1", False),  # NAT64 to 10.0.0.1
        ("64:ff9b::5db8:d70e", True),  # NAT64 to 93.184.215.14
        ("2002:a00:1::1", False),  # 6to4 from 10.0.0.1
    ],
)
def test_only_public_addresses_may_be_called(address: str, public: bool) -> None:
    assert public_address(address) is public


def test_a_url_naming_a_private_address_is_refused_and_a_name_is_left_to_the_resolver() -> None:
    assert refused_address("http://169.254.169.254/latest") is not None
    assert refused_address("http://[::1]:8080/hook") is not None
    assert refused_address("https://93.184.215.14/hook") is None
    assert refused_address("https://hooks.example.com/x") is None
    # Full-width digits and ideographic dots: the URL library makes them 127.0.0.1, and aiohttp
    # connects to that address without asking a resolver.
    for url in ("http://１２７.0.0.1:8/x", "http://127。0。0。1/x", "http://127．0．0．1/x"):
        assert refused_address(url) is not None, url


class Answers:
    def __init__(self, *hosts: str) -> None:
        self.hosts = hosts

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:  # fmt: skip
        return [
            ResolveResult(hostname=host, host=h, port=port, family=family, proto=0, flags=0)
            for h in self.hosts
        ]

    async def close(self) -> None:
        return None


def test_a_name_resolving_to_private_addresses_is_not_called_at_all() -> None:
    async def resolved(*answers: str) -> list[str]:
        resolver = PublicResolver()
        resolver._inner = Answers(*answers)  # type: ignore[assignment]
        return [r["host"] for r in await resolver.resolve("hooks.example.com", 443)]

    assert asyncio.run(resolved("10.0.0.5", "93.184.215.14")) == ["93.184.215.14"]
    with pytest.raises(OSError, match="no public address"):
        asyncio.run(resolved("127.0.0.1", "169.254.169.254"))
