"""Requests without a batch over HTTP (core §2.4): the listing's filters and their checks, and
the wire shapes of a listed request and of its detail."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, get_args

import msgspec

from projections.rules.content import json_or_text, unix_seconds
from schemas.api_requests import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    RequestDetails,
    RequestState,
    RequestSummary,
    ServiceTier,
)
from schemas.errors import ApiError, invalid_request

STATES: tuple[str, ...] = get_args(RequestState)
TERMINAL = frozenset({"completed", "failed", "canceled"})
SERVICE_TIERS: tuple[str, ...] = get_args(ServiceTier)
_TRUE, _FALSE = ("true", "1"), ("false", "0")


class ListFilter(msgspec.Struct, frozen=True, kw_only=True):
    """list_requests' filter (core §2.4). A list that is present but empty matches nothing."""

    status: str | None = None
    models: list[str] | None = None
    service_tiers: list[str] | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    active_first: bool = False
    skip: int = 0
    limit: int = DEFAULT_LIMIT


def check_state(status: str) -> str:
    if status not in STATES:
        raise ApiError(
            400,
            f"Invalid status filter '{status}'. Allowed values: " + ", ".join(STATES),
            code="invalid_request",
            param="status",
        )
    return status


def parse_skip(raw: str | None) -> int:
    if raw is None:
        return 0
    value = _integer(raw, "skip")
    if value < 0:
        raise invalid_request("skip must be >= 0", param="skip")
    return value


def parse_limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    value = _integer(raw, "limit")
    if value <= 0:
        raise invalid_request("limit must be > 0", param="limit")
    return min(value, MAX_LIMIT)


def _integer(raw: str, name: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise invalid_request(f"{name} must be an integer", param=name) from None
    if abs(value) > 2**62:
        raise invalid_request(f"{name} is out of range", param=name)
    return value


def parse_bool(raw: str | None, name: str) -> bool:
    if raw is None:
        return False
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise invalid_request(f"{name} must be true or false", param=name)


def parse_list(values: Sequence[str]) -> list[str] | None:
    """A list parameter, repeated (`models=a&models=b`) or comma-separated (`models=a,b`):
    absent → None (no filter); present → its non-blank items (maybe none: nothing matches)."""
    if not values:
        return None
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def check_tiers(tiers: list[str] | None) -> list[str] | None:
    for tier in tiers or ():
        if tier not in SERVICE_TIERS:
            raise invalid_request(
                f"Invalid service tier '{tier}'. Allowed values: " + ", ".join(SERVICE_TIERS),
                param="service_tiers",
            )
    return tiers


def _ts(at: datetime | None) -> int | None:
    return None if at is None else unix_seconds(at)


def duration_ms(started_at: datetime | None, completed_at: datetime | None) -> int | None:
    """completed_at − started_at, only when both exist (core §2.4)."""
    if started_at is None or completed_at is None:
        return None
    return int((completed_at - started_at).total_seconds() * 1000)


def _summary_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "request",
        "model": row["model"],
        "status": row["state"],
        "created_at": unix_seconds(row["created_at"]),
        "completed_at": _ts(row["completed_at"]),
        "failed_at": _ts(row["failed_at"]),
        "duration_ms": duration_ms(row["started_at"], row["completed_at"]),
        "response_status": row["response_status"],
        "service_tier": row["service_tier"],
    }


def summary(row: Mapping[str, Any]) -> RequestSummary:
    """A listed request (core §2.4 list_requests rows); times in Unix seconds."""
    return RequestSummary(**_summary_fields(row))


def detail(row: Mapping[str, Any]) -> RequestDetails:
    """get_request_detail (core §2.4): the summary, the request body and the response body
    (each parsed as JSON, else kept as text; null when absent), and the raw error text. A
    result shows only with its state: a retried row's earlier outcome is not its own any more."""
    state = row["state"]
    response = _text(row["response_body"]) if state == "completed" else None
    return RequestDetails(
        **_summary_fields(row),
        body=json_or_text(_text(row["body"])),
        response_body=json_or_text(response),
        error=_text(row["error"]) if state == "failed" else None,
    )


def _text(value: bytes | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return bytes(value).decode("utf-8", "replace")
