"""API keys: stored as sha256 hashes in PostgreSQL; the secret is shown once at creation."""

from __future__ import annotations

import hashlib
import secrets
import uuid

import asyncpg

KEY_PREFIX = "cn-"


def hash_key(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


async def create_key(conn: asyncpg.Connection, user: str) -> str:
    """Create the user if new and a fresh key for them; returns the secret."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    async with conn.transaction():
        await conn.execute("INSERT INTO users (id) VALUES ($1) ON CONFLICT DO NOTHING", user)
        await conn.execute(
            "INSERT INTO api_keys (id, user_id, key_hash) VALUES ($1, $2, $3)",
            uuid.uuid4(),
            user,
            hash_key(secret),
        )
    return secret


class Principal:
    __slots__ = ("user", "key_id")

    def __init__(self, user: str, key_id: str) -> None:
        self.user = user
        self.key_id = key_id


async def authenticate(pool: asyncpg.Pool, header: str | None) -> Principal | None:
    if not header or not header.startswith("Bearer "):
        return None
    row = await pool.fetchrow(
        "SELECT id::text, user_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        hash_key(header[len("Bearer ") :].strip()),
    )
    return None if row is None else Principal(row["user_id"], row["id"])
