"""Flex requests without a batch (§7.5–§7.7): the body goes to the bodies topic, then a
SubmitRequest for the engine, which queues, claims and runs it like a batch row."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from projections.api.app import Context
from projections.api.auth import Principal
from projections.api.intake import flex_body
from schemas import bodies, ids, topics
from schemas.commands import SubmitRequest
from schemas.errors import ApiError


async def submit(
    ctx: Context,
    who: Principal,
    request_id: str,
    model: str,
    path: str,
    body: dict[str, Any],
    *,
    background: bool = False,
) -> datetime:
    """Hands the request to the engine; returns its creation time."""
    created_at = datetime.now(UTC)
    partition = bodies.partition_for(request_id, topics.BODIES.partitions)
    try:
        [ref] = await ctx.publisher.bodies(
            [(bodies.key(bodies.TEMPLATE, request_id), flex_body(body), partition)]
        )
        await ctx.publisher.commands(
            [
                SubmitRequest(
                    command_id=ids.new_id(),
                    issued_at=created_at,
                    request_id=request_id,
                    owner=who.user,
                    model=model,
                    path=path,
                    body=ref,
                    created_at=created_at,
                    background=background,
                    api_key_id=who.key_id,
                )
            ]
        )
    except ApiError as exc:  # §7.5 step 2 names this answer
        raise ApiError(500, "Failed to enqueue request", code=500) from exc
    return created_at
