"""HTTP API objects of requests without a batch (`/v1/requests`: flex and realtime rows) and
the parameters of their listing; see :mod:`schemas.api`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from schemas.api import MAX_QUERY_INT, Flag, TimeBound

RequestState = Literal["pending", "claimed", "processing", "completed", "failed", "canceled"]
ServiceTier = Literal["flex", "priority", "auto", "default"]
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000  # larger asks get this many, as listings clamp

Names = Annotated[
    list[str], msgspec.Meta(description="Repeated (`models=a&models=b`) or comma-separated")
]


class RequestListQuery(msgspec.Struct, forbid_unknown_fields=True):
    """Filters of the caller's requests without a batch; a list present but empty matches
    nothing. Pages are offsets (`skip`, `limit`) with the `total_count` of every match."""

    status: RequestState | None = None
    models: Names | None = None
    service_tiers: (
        Annotated[list[ServiceTier], msgspec.Meta(description="Repeated or comma-separated")] | None
    ) = None
    created_after: TimeBound | None = None
    created_before: TimeBound | None = None
    active_first: Flag = False
    skip: Annotated[int, msgspec.Meta(ge=0, le=MAX_QUERY_INT)] = 0
    limit: Annotated[
        int, msgspec.Meta(ge=1, le=MAX_QUERY_INT, description=f"Larger values read {MAX_LIMIT}")
    ] = DEFAULT_LIMIT


class RequestSummary(msgspec.Struct, forbid_unknown_fields=True):
    """A listed request; times in Unix seconds."""

    id: str
    object: Literal["request"]
    model: str
    status: RequestState
    created_at: int
    completed_at: int | None
    failed_at: int | None
    duration_ms: int | None
    response_status: int | None
    service_tier: str


class RequestDetails(RequestSummary):
    """A request with its body and, once it has ended, its response body or error text."""

    body: Any  # parsed as JSON, else the text
    response_body: Any
    error: str | None


class RequestList(msgspec.Struct, forbid_unknown_fields=True):
    object: Literal["list"]
    data: list[RequestSummary]
    has_more: bool
    total_count: int
