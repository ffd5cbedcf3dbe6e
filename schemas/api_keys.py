"""HTTP API objects for a user's own API keys (``/v1/keys``): ids and times, never secrets."""

from __future__ import annotations

from typing import Literal

import msgspec


class ApiKeyObject(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    object: Literal["api_key"]
    created_at: int
    revoked_at: int | None
    # Whether this is the key that authenticated the request that listed it.
    current: bool


class ApiKeyList(msgspec.Struct, forbid_unknown_fields=True):
    object: Literal["list"]
    data: list[ApiKeyObject]
