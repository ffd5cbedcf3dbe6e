"""How many webhook endpoints a user may have (projections/webhooks.py): each is a delivery of
every batch of theirs, made from the one queue all users share."""

from __future__ import annotations

import pytest

from projections.webhook_signing import SecretBox, new_key
from projections.webhooks import MAX_ENDPOINTS, register
from schemas.api_webhooks import WebhookRegistration
from schemas.errors import ApiError


class Pool:
    def __init__(self, live: int) -> None:
        self.live = live

    async def fetchval(self, query: str, *args: object) -> int:
        assert "count(*)" in query and args == ("alice",)
        return self.live


class Publisher:
    def __init__(self) -> None:
        self.sent: list[object] = []

    async def events(self, topic: object, records: list[object]) -> None:
        self.sent += records


async def test_a_user_at_the_limit_cannot_register_another_endpoint() -> None:
    publisher = Publisher()
    with pytest.raises(ApiError) as info:
        await register(
            publisher, Pool(MAX_ENDPOINTS), SecretBox([new_key()]), "alice",  # type: ignore[arg-type]
            WebhookRegistration(url="https://hooks.example.com/x"),
        )  # fmt: skip
    assert (info.value.status, info.value.code) == (400, "too_many_webhooks")
    assert publisher.sent == []
