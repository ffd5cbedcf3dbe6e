"""The batch notifier (core §4.9): runs in every API process, and each terminal batch reaches
each of its owner's webhook endpoints once, whatever the number of replicas and restarts.

Two steps per cycle, both safe to run in several processes at once:

1. **Notify.** Batches that reached a terminal state (``completed``, ``failed``,
   ``cancelled``, ``expired``) and are not notified get a ``BatchNotified`` on the batches
   topic naming one delivery per subscribed endpoint; the projector stamps
   ``notification_sent_at`` and opens the deliveries. A replica takes a batch under a
   transaction-scoped advisory lock and waits until the stamp is projected before letting go
   (the batches row is the projector's to write: a row lock on it would stall the projector).
   Before looking, the notifier waits until the projector has applied every record already
   on the batches and requests topics, so a read model being rebuilt cannot show a batch as
   ended that the log goes on to delete (or to retry).
   Ids are derived from (batch, retry_version, endpoint), and the projector keeps only the
   first notification of a version, so a race that still published twice changes nothing.
2. **Deliver.** Due deliveries are claimed with ``FOR NO KEY UPDATE SKIP LOCKED`` on their
   ``webhook_deliveries`` rows (which the projector only inserts, never updates). The holder
   sends the signed POST, publishes the ``WebhookAttempted``, waits until the projection
   shows it (the delivery closed, or due later), then commits; another replica skips the
   locked row meanwhile and finds it no longer due afterwards. Before claiming, the notifier
   waits until the projector has applied every attempt already on the deliveries topic, so
   a read model being rebuilt from the log cannot make an old delivery look due again.

What remains is the limit of any webhook sender: a crash between the receiver's 2xx and the
attempt's record sends that delivery again, with the same ``webhook-id`` for the receiver to
deduplicate (Standard Webhooks).
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import msgspec

from cannonade.config import WebhooksConfig
from projections import catchup
from projections.api.publisher import Publisher
from projections.rules.batches import BatchFacts, derive_status
from projections.webhook_hosts import PublicResolver, refused_address
from projections.webhook_signing import SecretBox, SecretError, headers
from projections.webhooks import message_id
from schemas import ids, topics
from schemas.events import BatchNotified, EncryptedSecret, NotifiedDelivery, WebhookAttempted

log = logging.getLogger(__name__)

EVENT_TYPES = {
    "completed": "batch.completed",
    "failed": "batch.failed",
    "cancelled": "batch.cancelled",
    "expired": "batch.expired",
}
_LOCK_SPACE = 0x5742484B  # advisory-lock namespace of batch notifications
_PROJECTION_WAIT_S = 30.0
_ERROR_TEXT = 500  # characters of a failure kept in the attempt record

# Terminal by count (frozen), or ended before population (failed, or cancelled first).
_CANDIDATES = """
SELECT b.id::text AS id, b.owner, b.retry_version, b.created_at, b.expires_at,
       b.requests_started_at, b.cancelling_at, b.cancelled_at, b.finalizing_at,
       b.completed_at, b.failed_at, b.counts_frozen_at, b.total_requests,
       COALESCE(b.completed_requests, c.completed, 0) AS completed,
       COALESCE(b.failed_requests, c.failed, 0) AS failed,
       COALESCE(b.canceled_requests, c.canceled, 0) AS canceled
FROM batches b LEFT JOIN batch_counts c ON c.batch_id = b.id
WHERE b.notification_sent_at IS NULL AND b.deleted_at IS NULL AND b.owner IS NOT NULL
  AND (b.counts_frozen_at IS NOT NULL
       OR (b.requests_started_at IS NULL AND (b.failed_at IS NOT NULL OR b.cancelling_at IS NOT NULL)))
ORDER BY b.id
LIMIT $1
"""
_DUE = """
SELECT d.id::text AS id, d.webhook_id::text AS webhook_id, d.batch_id::text AS batch_id,
       d.event_type, d.notification_id, d.terminal_at, o.attempts,
       w.url, w.secret_key_id, w.secret_sealed
FROM webhook_open o
JOIN webhook_deliveries d ON d.id = o.delivery_id
JOIN webhooks w ON w.id = d.webhook_id AND w.deleted_at IS NULL AND w.secret_sealed IS NOT NULL
-- Only what this process can sign: a secret sealed with a key it lacks (another replica's, or
-- one dropped from the configuration) must not hold the queue's head for everyone.
WHERE o.due_at <= now() AND w.secret_key_id = ANY($2::text[])
ORDER BY o.due_at
LIMIT $1
FOR NO KEY UPDATE OF d SKIP LOCKED
"""


def event_type(row: Any, now: datetime) -> str | None:
    """The OpenAI event of a batch that ended, from the same rules the batch object shows
    (:func:`projections.rules.batches.derive_status`); None while it is not terminal."""
    ended = (row["completed_at"], row["failed_at"], row["cancelled_at"])
    deadline = row["expires_at"]
    expired = (
        row["requests_started_at"] is not None
        and now > deadline
        and not any(at is not None and at <= deadline for at in ended)
    )
    frozen = row["counts_frozen_at"] is not None
    facts = BatchFacts(
        id=row["id"], endpoint="", input_file_id=None, completion_window="",
        output_file_id=None, error_file_id=None, metadata=None, created_at=row["created_at"],
        expires_at=deadline, requests_started_at=row["requests_started_at"],
        cancelling_at=row["cancelling_at"], cancelled_at=row["cancelled_at"],
        failed_at=row["failed_at"], completed_at=row["completed_at"],
        finalizing_at=row["finalizing_at"], expired_at=deadline if expired else None,
        total=row["total_requests"], pending=0 if frozen else 1, in_progress=0,
        completed=row["completed"], failed=row["failed"], canceled=row["canceled"],
    )  # fmt: skip
    return EVENT_TYPES.get(derive_status(facts))


def terminal_at(row: Any, kind: str) -> datetime:
    if kind == "batch.expired":
        return row["expires_at"]  # type: ignore[no-any-return]
    stamps: tuple[datetime | None, ...] = (
        row["completed_at"], row["failed_at"], row["cancelled_at"], row["counts_frozen_at"],
    )  # fmt: skip
    if kind == "batch.cancelled":
        stamps = (row["counts_frozen_at"], row["cancelled_at"])
    return next((at for at in stamps if at is not None), row["created_at"])


def notification_id(batch_id: str, retry_version: int) -> str:
    return "evt_" + ids.derived("webhook-event", batch_id, retry_version).replace("-", "")


def delivery_id(batch_id: str, retry_version: int, webhook_id: str) -> str:
    return ids.derived("webhook-delivery", batch_id, retry_version, webhook_id)


def payload(notification: str, kind: str, at: datetime, batch_id: str) -> bytes:
    """The body OpenAI sends for a batch event; the same bytes on every attempt."""
    return msgspec.json.encode(
        {
            "id": notification,
            "object": "event",
            "type": kind,
            "created_at": int(at.timestamp()),
            "data": {"id": batch_id},
        }
    )


def backoff(config: WebhooksConfig, attempt: int) -> timedelta:
    """The wait after failed attempt ``attempt`` (1-based)."""
    ms = min(config.backoff_ms * config.backoff_factor ** (attempt - 1), config.max_backoff_ms)
    return timedelta(milliseconds=ms)


def _lock_key(batch_id: str, retry_version: int) -> int:
    return zlib.crc32(f"{batch_id}/{retry_version}".encode()) - 2**31


class Notifier:
    def __init__(
        self,
        config: WebhooksConfig,
        pool: asyncpg.Pool,
        publisher: Publisher,
        bootstrap: str,
        box: SecretBox,
    ) -> None:
        self.config = config
        self.pool = pool
        self.publisher = publisher
        self.bootstrap = bootstrap
        self.box = box
        self._stop = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._offsets = catchup.offsets_reader(bootstrap)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Cycle until stopped; a failing cycle is logged and retried after the interval."""
        interval = self.config.poll_interval_ms / 1000
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_ms / 1000)
        resolver = None if self.config.private_hosts else PublicResolver()
        connector = aiohttp.TCPConnector(resolver=resolver)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            self._session = session
            started = False
            try:
                while not self._stop.is_set():
                    try:
                        if not started:
                            await self._offsets.start()
                            started = True
                    except Exception:
                        log.exception("webhook notifier could not start")
                        self._offsets = catchup.offsets_reader(self.bootstrap)  # not reused
                    else:
                        # Each step on its own: one that fails for good must not stop the other.
                        for step in (self.notify, self.deliver):
                            try:
                                await step()
                            except Exception:
                                log.exception("webhook notifier step %s failed", step.__name__)
                    try:
                        await asyncio.wait_for(self._stop.wait(), interval)
                    except TimeoutError:
                        pass
            finally:
                if started:
                    await self._offsets.stop()

    # -- 1. notify ------------------------------------------------------------------------

    async def notify(self) -> int:
        """Publish the notification of every terminal batch not notified yet; returns how
        many this process published."""
        # A read model rebuilt from the log shows a batch deleted while it ran as ended and
        # not deleted until its deletion is projected: notifying it then would add to the log
        # a notification the live run never made.
        ends = await catchup.end_offsets(self._offsets, [topics.BATCHES, topics.REQUESTS])
        if not await catchup.until_projected(self.pool, ends, _PROJECTION_WAIT_S):
            log.info("the projector is behind on batches; notifications wait")
            return 0
        now = datetime.now(UTC)
        candidates = await self.pool.fetch(_CANDIDATES, self.config.batch_size)
        due = [(r, kind) for r in candidates if (kind := event_type(r, now)) is not None]
        if not due:
            return 0
        async with self.pool.acquire() as conn, conn.transaction():
            mine = []
            for row, kind in due:
                key = _lock_key(row["id"], row["retry_version"])
                if await conn.fetchval(
                    "SELECT pg_try_advisory_xact_lock($1, $2)", _LOCK_SPACE, key
                ) and await conn.fetchval(
                    "SELECT true FROM batches WHERE id = $1 AND retry_version = $2"
                    " AND notification_sent_at IS NULL",
                    row["id"], row["retry_version"],
                ):  # fmt: skip
                    mine.append((row, kind))
            if not mine:
                return 0
            events = [await self._notification(conn, row, kind, now) for row, kind in mine]
            await self.publisher.events(topics.BATCHES, [(e.batch_id, e) for e in events])
            await self._until_stamped(conn, events)
        return len(events)

    async def _notification(
        self, conn: asyncpg.Connection, row: Any, kind: str, now: datetime
    ) -> BatchNotified:
        batch_id, version = row["id"], row["retry_version"]
        # An endpoint hears of the batches that end while it exists, not of its owner's past
        # (webhooks switched on later would otherwise send the whole history).
        endpoints = await conn.fetch(
            "SELECT id::text AS id FROM webhooks WHERE owner = $1 AND deleted_at IS NULL"
            " AND $2 = ANY(event_types) AND created_at <= $3 ORDER BY id",
            row["owner"],
            kind,
            terminal_at(row, kind),
        )
        return BatchNotified(
            event_id=ids.event_id("batch-notified", batch_id, version),
            occurred_at=now,
            batch_id=batch_id,
            owner=row["owner"],
            retry_version=version,
            event_type=kind,
            notification_id=notification_id(batch_id, version),
            terminal_at=terminal_at(row, kind),
            deliveries=[
                NotifiedDelivery(delivery_id(batch_id, version, e["id"]), e["id"])
                for e in endpoints
            ],
        )

    async def _until_stamped(self, conn: asyncpg.Connection, events: Sequence[BatchNotified]) -> None:  # fmt: skip
        """Hold the advisory locks until the projection shows every stamp (or the batch moved
        to another version), so no other replica publishes the same notification."""
        deadline = time.monotonic() + _PROJECTION_WAIT_S
        pending = {e.batch_id: e.retry_version for e in events}
        while pending:
            for r in await conn.fetch(
                "SELECT id::text AS id, retry_version, notification_sent_at FROM batches"
                " WHERE id = ANY($1::uuid[])",
                list(pending),
            ):
                if r["notification_sent_at"] is not None or r["retry_version"] != pending[r["id"]]:
                    pending.pop(r["id"])
            if not pending or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        if pending:
            log.warning("notifications of %d batches not projected in time", len(pending))

    # -- 2. deliver -----------------------------------------------------------------------

    async def deliver(self) -> int:
        """Make the due delivery attempts this process can claim; returns how many."""
        ends = await catchup.end_offsets(self._offsets, [topics.WEBHOOK_DELIVERIES])
        if not await catchup.until_projected(self.pool, ends, _PROJECTION_WAIT_S):
            log.info("the projector is behind on webhook attempts; deliveries wait")
            return 0
        async with self.pool.acquire() as conn, conn.transaction():
            claimed = await conn.fetch(_DUE, self.config.batch_size, self.box.key_ids)
            if not claimed:
                return 0
            # Under the locks, with a fresh snapshot: a replica that held a row until just now
            # has had its attempt projected, and the row is no longer due.
            still = {
                r["delivery_id"]: r["attempts"]
                for r in await conn.fetch(
                    "SELECT delivery_id::text AS delivery_id, attempts FROM webhook_open"
                    " WHERE delivery_id = ANY($1::uuid[]) AND due_at <= now()",
                    [r["id"] for r in claimed],
                )
            }
            rows = [r for r in claimed if still.get(r["id"]) == r["attempts"]]
            attempts = [a for a in await asyncio.gather(*map(self._attempt, rows)) if a]
            if not attempts:
                return 0
            await self.publisher.events(
                topics.WEBHOOK_DELIVERIES, [(a.delivery_id, a) for a in attempts]
            )
            await self._until_recorded(conn, attempts)
        return len(attempts)

    async def _attempt(self, row: Any) -> WebhookAttempted | None:
        delivery, webhook = row["id"], row["webhook_id"]
        try:
            secret = self.box.open(
                webhook, EncryptedSecret(row["secret_key_id"], row["secret_sealed"])
            )
        except SecretError as exc:  # another replica may hold the key: leave it due
            log.error("cannot sign for webhook %s: %s", webhook, exc)
            return None
        body = payload(row["notification_id"], row["event_type"], row["terminal_at"], row["batch_id"])  # fmt: skip
        attempt = row["attempts"] + 1
        started, at = time.monotonic(), datetime.now(UTC)
        status: int | None = None
        error: str | None = None
        assert self._session is not None
        refused = None if self.config.private_hosts else refused_address(row["url"])
        try:
            if refused is not None:
                raise ValueError(refused)
            sent = headers(secret, message_id(delivery), int(at.timestamp()), body)
            # A redirect is an answer, not a new destination: following one would turn the
            # POST into a GET to wherever it points.
            async with self._session.post(
                row["url"], data=body, headers=sent, allow_redirects=False
            ) as response:
                status = response.status
                if not 200 <= status < 300:
                    # The head only: a receiver may answer gigabytes, read into every replica.
                    head = await response.content.read(4 * _ERROR_TEXT)
                    error = head.decode("utf-8", "replace")[:_ERROR_TEXT] or None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            error = (f"{type(exc).__name__}: {exc}")[:_ERROR_TEXT]
        if error is not None:  # the receiver's words, kept in a PostgreSQL text column
            error = error.replace("\x00", "\ufffd")
        duration = int((time.monotonic() - started) * 1000)
        next_at: datetime | None = None
        if status is not None and 200 <= status < 300:
            outcome = "delivered"
        elif attempt >= self.config.max_attempts:
            outcome = "failed"
        else:
            outcome, next_at = "retry", at + backoff(self.config, attempt)
        log.info("webhook %s delivery %s attempt %d: %s (%s)", webhook, delivery, attempt, outcome, status or error)  # fmt: skip
        return WebhookAttempted(
            event_id=ids.event_id("webhook-attempt", delivery, attempt),
            occurred_at=at,
            delivery_id=delivery,
            webhook_id=webhook,
            batch_id=row["batch_id"],
            attempt=attempt,
            attempted_at=at,
            outcome=outcome,  # type: ignore[arg-type]
            status_code=status,
            error=error,
            duration_ms=duration,
            next_attempt_at=next_at,
        )

    async def _until_recorded(self, conn: asyncpg.Connection, attempts: Sequence[WebhookAttempted]) -> None:  # fmt: skip
        deadline = time.monotonic() + _PROJECTION_WAIT_S
        keys = ([a.delivery_id for a in attempts], [a.attempt for a in attempts])
        while True:
            found = await conn.fetchval(
                "SELECT count(*) FROM webhook_attempts a JOIN unnest($1::uuid[], $2::int[])"
                " AS u(id, n) ON a.delivery_id = u.id AND a.attempt = u.n",
                *keys,
            )
            if found >= len(attempts):
                return
            if time.monotonic() > deadline:
                log.warning("webhook attempts not projected in time; a replica may repeat them")
                return
            await asyncio.sleep(0.02)
