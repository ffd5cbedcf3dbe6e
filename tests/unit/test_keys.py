"""Issuing an API key (projections/api/auth.py): the secret exists only in the answer, so a
read model slow to show the key must not swallow it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from projections.api.auth import KeyNotShownYet, hash_key, issue_key
from schemas.events import ApiKey


class Publisher:
    def __init__(self) -> None:
        self.published: list[ApiKey] = []

    async def key(self, record: ApiKey) -> None:
        self.published.append(record)


class NeverProjected:
    async def fetchval(self, query: str, *args: Any) -> None:
        return None


def test_a_key_the_read_model_does_not_show_in_time_still_hands_back_its_secret() -> None:
    publisher = Publisher()
    with pytest.raises(KeyNotShownYet) as info:
        asyncio.run(issue_key(publisher, NeverProjected(), "ana", timeout_s=0.1))  # type: ignore[arg-type]
    [record] = publisher.published
    assert info.value.key_id == record.key_id
    assert hash_key(info.value.secret).hex() == record.key_hash  # the key that went out
