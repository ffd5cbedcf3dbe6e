"""API keys: issued and revoked as ApiKey records on the compacted keys topic (the sha256 hash
only; the secret is shown once at creation), projected into ``api_keys`` for authentication.
A rebuild of the read models from the log restores every key."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
import uuid
from datetime import UTC, datetime

import asyncpg
import msgspec

from projections.api.publisher import Publisher
from schemas import codec, ids
from schemas.errors import ApiError
from schemas.events import ApiKey

KEY_PREFIX = "cn-"


def hash_key(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Principal:
    __slots__ = ("user", "key_id")

    def __init__(self, user: str, key_id: str) -> None:
        self.user = user
        self.key_id = key_id


class KeyInfo(msgspec.Struct, frozen=True):
    id: str
    user: str
    created_at: datetime
    revoked_at: datetime | None


async def authenticate(pool: asyncpg.Pool, header: str | None) -> Principal | None:
    if not header or not header.startswith("Bearer "):
        return None
    row = await pool.fetchrow(
        "SELECT id::text, user_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        hash_key(header[len("Bearer ") :].strip()),
    )
    return None if row is None else Principal(row["user_id"], row["id"])


async def _until(check: asyncpg.Connection, query: str, *args: object, timeout_s: float) -> None:
    """Wait until ``query`` finds a row: the caller's next request must see the key."""
    deadline = time.monotonic() + timeout_s
    while await check.fetchval(query, *args) is None:
        if time.monotonic() > deadline:
            raise TimeoutError("the key was published but not projected in time; is the projector running?")  # fmt: skip
        await asyncio.sleep(0.05)


class KeyNotShownYet(TimeoutError):
    """The key went out but the read model did not show it in time (is the projector
    running?): it works once projected. Carries the secret, which exists nowhere else."""

    def __init__(self, key_id: str, secret: str) -> None:
        super().__init__(
            f"key {key_id} was published but is not in the read model yet; it works once the"
            " projector has applied it"
        )
        self.key_id, self.secret = key_id, secret


async def issue_key(
    publisher: Publisher, conn: asyncpg.Connection, user: str, timeout_s: float = 60.0
) -> tuple[str, str]:
    """Create a key for ``user``; returns (key id, secret). The secret is never stored."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    record = ApiKey(
        event_id=ids.new_id(),
        occurred_at=now,
        key_id=key_id,
        user=user,
        key_hash=hash_key(secret).hex(),
        created_at=now,
    )
    try:  # the projector's own check, before anything is published (a key it refuses never works)
        codec.api_keys.decode(codec.encode(record))
    except codec.DecodeErrors as exc:
        raise ApiError(400, f"Invalid user {user[:64]!r}: {exc}", param="user") from None
    await publisher.key(record)
    try:
        await _until(conn, "SELECT 1 FROM api_keys WHERE id = $1", key_id, timeout_s=timeout_s)
    except TimeoutError:
        raise KeyNotShownYet(key_id, secret) from None
    return key_id, secret


async def publish_revocation(
    publisher: Publisher, conn: asyncpg.Connection | asyncpg.Pool, key_id: str
) -> bool:
    """Publish a key's revocation without waiting for its projection; False when there is
    no such key."""
    row = await conn.fetchrow(
        "SELECT user_id, key_hash, created_at FROM api_keys WHERE id = $1", key_id
    )
    if row is None:
        return False
    now = datetime.now(UTC)
    await publisher.key(
        ApiKey(
            event_id=ids.new_id(),
            occurred_at=now,
            key_id=key_id,
            user=row["user_id"],
            key_hash=bytes(row["key_hash"]).hex(),
            created_at=row["created_at"],
            revoked_at=now,
        )
    )
    return True


async def revoke_key(
    publisher: Publisher, conn: asyncpg.Connection, key_id: str, timeout_s: float = 60.0
) -> bool:
    """Revoke a key and wait until it no longer authenticates; False when there is no such key."""
    if not await publish_revocation(publisher, conn, key_id):
        return False
    await _until(
        conn,
        "SELECT 1 FROM api_keys WHERE id = $1 AND revoked_at IS NOT NULL",
        key_id,
        timeout_s=timeout_s,
    )
    return True


async def list_keys(
    conn: asyncpg.Connection | asyncpg.Pool, user: str | None = None
) -> list[KeyInfo]:
    rows = await conn.fetch(
        "SELECT id::text AS id, user_id AS user, created_at, revoked_at FROM api_keys"
        " WHERE $1::text IS NULL OR user_id = $1 ORDER BY created_at, id",
        user,
    )
    return [KeyInfo(**dict(r)) for r in rows]


async def create_key(bootstrap: str, dsn: str, user: str) -> str:
    """Issue a key for ``user`` against a broker and database; returns its secret."""
    publisher = Publisher(bootstrap)
    conn = await asyncpg.connect(dsn)
    try:
        _, secret = await issue_key(publisher, conn, user)
        return secret
    finally:
        await conn.close()
        await publisher.stop()
