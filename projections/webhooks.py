"""Webhook endpoints: registered and deleted as WebhookEndpoint records on the compacted
webhooks topic (the signing secret sealed, :mod:`projections.webhook_signing`), read back from
the read model; and the deliveries a user can inspect. Shared by the HTTP API and the CLI.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import asyncpg
import msgspec

from projections.api.publisher import Publisher
from projections.webhook_signing import (
    SecretBox,
    SecretError,
    generate_secret,
    secret_bytes,
    secret_hint,
)
from schemas import ids, topics
from schemas.api_webhooks import (
    BATCH_EVENTS,
    CreatedWebhookEndpoint,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpointObject,
    WebhookRegistration,
)
from schemas.errors import ApiError, invalid_request
from schemas.events import WebhookEndpoint

MAX_URL = 2048
MAX_NAME = 256
# Endpoints per user: every endpoint is a delivery of each of the user's batches, all made from
# one queue every user shares, and named in one notification record.
MAX_ENDPOINTS = 16


def check_registration(reg: WebhookRegistration) -> WebhookRegistration:
    """The API's and the CLI's rules for a new endpoint (400 on a violation)."""
    parts = urlsplit(reg.url)
    if parts.scheme not in ("http", "https") or not parts.hostname or len(reg.url) > MAX_URL:
        raise invalid_request("url must be an absolute http(s) URL", param="url")
    if "\x00" in reg.url or (reg.name is not None and ("\x00" in reg.name or len(reg.name) > MAX_NAME)):  # fmt: skip
        raise invalid_request("name must be at most 256 characters", param="name")
    types = list(dict.fromkeys(reg.event_types)) if reg.event_types is not None else None
    if types is not None and (not types or any(t not in BATCH_EVENTS for t in types)):
        raise invalid_request(
            f"event_types must be a non-empty subset of {', '.join(BATCH_EVENTS)}",
            param="event_types",
        )
    if reg.signing_secret is not None:
        try:
            secret_bytes(reg.signing_secret)
        except SecretError as exc:
            raise invalid_request(str(exc), param="signing_secret") from None
    return msgspec.structs.replace(reg, event_types=types)


def _unix(at: datetime) -> int:
    return int(at.timestamp())


def endpoint_object(row: Any) -> WebhookEndpointObject:
    """An endpoint as OpenAI shows one (``webhook_endpoint``), without its secret."""
    return WebhookEndpointObject(**_endpoint_fields(row))


def _endpoint_fields(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "webhook_endpoint",
        "url": row["url"],
        "name": row["name"],
        "event_types": list(row["event_types"]),
        "created_at": _unix(row["created_at"]),
        "signing_secret_hint": row["secret_hint"],
    }


_ENDPOINT = (
    "SELECT id::text AS id, owner, url, name, event_types, secret_hint, created_at"
    " FROM webhooks WHERE deleted_at IS NULL"
)


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float) -> None:
    """Read-your-writes for the CLI and the API: the caller's next read must see it."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while not await check():
        if time.monotonic() > deadline:
            raise ApiError(
                503,
                f"Timed out waiting for {what} to be recorded; it was accepted and will appear",
                code="projection_lag",
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


async def register(
    publisher: Publisher,
    pool: asyncpg.Pool | asyncpg.Connection,
    box: SecretBox,
    owner: str,
    reg: WebhookRegistration,
    *,
    timeout_s: float = 60.0,
) -> CreatedWebhookEndpoint:
    """Register an endpoint for ``owner``; returns it with its signing secret (shown once).
    An invalid registration is a 400 whether or not webhooks are enabled."""
    reg = check_registration(reg)
    if not box.enabled:
        raise ApiError(
            501,
            "Webhooks are not enabled on this server (no webhooks.secret_keys configured)",
            code="webhooks_disabled",
        )
    live = await pool.fetchval(
        "SELECT count(*) FROM webhooks WHERE owner = $1 AND deleted_at IS NULL", owner
    )
    if live >= MAX_ENDPOINTS:
        raise ApiError(
            400,
            f"At most {MAX_ENDPOINTS} webhook endpoints per user; delete one first",
            code="too_many_webhooks",
        )
    secret = reg.signing_secret or generate_secret()
    webhook_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    record = WebhookEndpoint(
        event_id=ids.new_id(),
        occurred_at=now,
        webhook_id=webhook_id,
        owner=owner,
        url=reg.url,
        name=reg.name or "",
        event_types=reg.event_types or list(BATCH_EVENTS),
        created_at=now,
        secret=box.seal(webhook_id, secret),
        secret_hint=secret_hint(secret),
    )
    await publisher.events(topics.WEBHOOKS, [(webhook_id, record)])

    async def shown() -> bool:
        return bool(await pool.fetchval("SELECT true FROM webhooks WHERE id = $1", webhook_id))

    await _until(shown, "the webhook endpoint", timeout_s)
    row = await pool.fetchrow(_ENDPOINT + " AND id = $1", webhook_id)
    return CreatedWebhookEndpoint(**_endpoint_fields(row), signing_secret=secret)


async def list_endpoints(pool: asyncpg.Pool | asyncpg.Connection, owner: str) -> list[WebhookEndpointObject]:  # fmt: skip
    rows = await pool.fetch(_ENDPOINT + " AND owner = $1 ORDER BY created_at DESC, id DESC", owner)
    return [endpoint_object(r) for r in rows]


async def get_endpoint(pool: asyncpg.Pool | asyncpg.Connection, owner: str, webhook_id: str) -> WebhookEndpointObject | None:  # fmt: skip
    row = await pool.fetchrow(_ENDPOINT + " AND owner = $1 AND id = $2", owner, webhook_id)
    return None if row is None else endpoint_object(row)


async def delete(
    publisher: Publisher,
    pool: asyncpg.Pool | asyncpg.Connection,
    owner: str,
    webhook_id: str,
    *,
    timeout_s: float = 60.0,
) -> bool:
    """Delete an endpoint of ``owner``; False when there is none. Its pending deliveries stop,
    and its sealed secret leaves the topic at the next compaction."""
    row = await pool.fetchrow(
        "SELECT owner, url, name, event_types, secret_hint, created_at FROM webhooks"
        " WHERE id = $1 AND owner = $2 AND deleted_at IS NULL",
        webhook_id,
        owner,
    )
    if row is None:
        return False
    now = datetime.now(UTC)
    record = WebhookEndpoint(
        event_id=ids.new_id(),
        occurred_at=now,
        webhook_id=webhook_id,
        owner=row["owner"],
        url=row["url"],
        name=row["name"],
        event_types=list(row["event_types"]),
        created_at=row["created_at"],
        secret=None,
        secret_hint=row["secret_hint"],
        deleted_at=now,
    )
    await publisher.events(topics.WEBHOOKS, [(webhook_id, record)])

    async def gone() -> bool:
        return bool(
            await pool.fetchval(
                "SELECT deleted_at IS NOT NULL FROM webhooks WHERE id = $1", webhook_id
            )
        )

    await _until(gone, "the deletion", timeout_s)
    return True


_DELIVERIES = """
SELECT d.id::text AS id, d.batch_id::text AS batch_id, d.event_type, d.notification_id,
       d.created_at, o.due_at,
       COALESCE(json_agg(json_build_object(
           'attempt', a.attempt, 'attempted_at', extract(epoch FROM a.attempted_at)::bigint,
           'status_code', a.status_code, 'error', a.error, 'duration_ms', a.duration_ms,
           'outcome', a.outcome) ORDER BY a.attempt) FILTER (WHERE a.attempt IS NOT NULL),
           '[]') AS attempts
FROM webhook_deliveries d
JOIN webhooks w ON w.id = d.webhook_id AND w.owner = $2
LEFT JOIN webhook_open o ON o.delivery_id = d.id
LEFT JOIN webhook_attempts a ON a.delivery_id = d.id
WHERE d.webhook_id = $1
  AND ($4::timestamptz IS NULL OR (d.created_at, d.id) < ($4, $5::uuid))
GROUP BY d.id, o.due_at
ORDER BY d.created_at DESC, d.id DESC
LIMIT $3
"""


def message_id(delivery_id: str) -> str:
    """The ``webhook-id`` of a delivery: one endpoint's copy of one event, kept by retries."""
    return "wh_" + uuid.UUID(delivery_id).hex


_decode_attempts = msgspec.json.Decoder(list[WebhookAttempt]).decode


def delivery_object(row: Any) -> WebhookDelivery:
    raw = row["attempts"]
    attempts = _decode_attempts(raw) if isinstance(raw, str) else []
    last = attempts[-1].outcome if attempts else None
    status: Literal["pending", "delivered", "failed"] = "pending"
    if last in ("delivered", "failed"):
        status = "delivered" if last == "delivered" else "failed"
    return WebhookDelivery(
        id=message_id(row["id"]),
        object="webhook_endpoint.delivery",
        event_id=row["notification_id"],
        event_type=row["event_type"],
        batch_id=row["batch_id"],
        created_at=_unix(row["created_at"]),
        status=status,
        next_attempt_at=None if row["due_at"] is None else _unix(row["due_at"]),
        attempts=attempts,
    )


async def deliveries(
    pool: asyncpg.Pool | asyncpg.Connection,
    owner: str,
    webhook_id: str,
    *,
    limit: int,
    after: str | None = None,
) -> list[WebhookDelivery]:
    """An endpoint's deliveries, newest first, each with its attempts (``after``: the last
    delivery id of the previous page)."""
    cursor: tuple[Any, Any] = (None, None)
    if after is not None:
        found = await pool.fetchrow(
            "SELECT created_at, id FROM webhook_deliveries WHERE id = $1 AND webhook_id = $2",
            after,
            webhook_id,
        )
        if found is None:
            return []
        cursor = (found["created_at"], found["id"])
    rows = await pool.fetch(_DELIVERIES, webhook_id, owner, limit, *cursor)
    return [delivery_object(r) for r in rows]


def delivery_id_of(message: str) -> str | None:
    """The delivery uuid behind a ``wh_`` id (a pagination cursor), or None."""
    try:
        return str(uuid.UUID(message.removeprefix("wh_")))
    except ValueError:
        return None
