"""A request without a batch read back from the read model, as the retrieval rules (§4) see it,
and the waits on it: until it exists (read-your-writes) and until it has ended (§6)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import asyncpg

from projections import queries
from projections.api.app import Context
from projections.rules.responses import RequestDetail, response_object
from schemas.errors import ApiError, not_found

# §6 polls every 500 ms: here only the fallback to the projector's notifications.
_POLL_S = 0.5


class Stored:
    def __init__(self, row: asyncpg.Record) -> None:
        self.detail = RequestDetail(
            id=row["id"],
            state=row["state"],
            model=row["model"],
            created_at=row["created_at"],
            completed_at=row["completed_at"],
            failed_at=row["failed_at"],
            response_status=row["response_status"],
            response_body=_text(row["response_body"]),
            error=_text(row["error"]),
            body=_text(row["body"]),
        )
        self._background: bool = row["background"]

    def response(self, head_id: str | None = None) -> dict[str, Any]:
        """The Responses object (§4.3). A flex request's stored body has lost `background`
        (§1.2), so the row's own flag counts too."""
        response = response_object(self.detail, head_id=head_id)
        response["background"] = response["background"] or self._background
        return response


def _text(value: bytes | None) -> str | None:
    return None if value is None else bytes(value).decode("utf-8", "replace")


async def load(ctx: Context, request_id: str, owner: str) -> Stored | None:
    row = await queries.batchless_request(ctx.pool, request_id, owner)
    return None if row is None else Stored(row)


async def until_recorded(ctx: Context, request_id: str) -> None:
    """A 202 answers once the row is projected, so the caller's first GET finds it."""
    await ctx.wait_for(lambda: queries.request_exists(ctx.pool, request_id), "the response")


async def until_settled(ctx: Context, request_id: str, owner: str, code: int | None) -> Stored:
    """§6: wait until the request has ended (a row not projected yet is waited for too); 504
    after `responses.poll_timeout_s`, with `code` in the envelope as the endpoint wants it.

    The projector's notification wakes the wait as the row ends; the slow poll is only the
    fallback for a notification lost with the listener's connection."""
    timeout = ctx.config.responses.poll_timeout_s
    deadline = time.monotonic() + timeout
    with ctx.wakeups.watch(request_id) as ended:
        while not await queries.request_settled(ctx.pool, request_id):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ApiError(
                    504,
                    f"Request timed out: Timeout waiting for request {request_id} to complete "
                    f"after {timeout:g}s",
                    code=code,
                    type="server_error",
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), min(_POLL_S, left))
            ended.clear()
    found = await load(ctx, request_id, owner)
    if found is None:  # only an erasure between the two reads can get here
        raise not_found("response", request_id)
    return found
