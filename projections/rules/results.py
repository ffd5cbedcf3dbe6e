"""A batch's results view (core §2.3 get_batch_results_stream, responses-and-api §8.4): one line
per row in line order, `{id, custom_id, model, input_body, response_body, error, status}`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_args

import msgspec

from projections.rules.content import json_or_text, jsonl
from schemas.api import BatchResultLine, ResultStatus
from schemas.errors import ApiError

# Row states as the results show them (canceled rows show as canceled: core §2.3 deviation).
_SHOWN: dict[str, ResultStatus] = {
    "pending": "pending",
    "claimed": "in_progress",
    "processing": "in_progress",
    "completed": "completed",
    "failed": "failed",
    "canceled": "canceled",
}
STATUSES: tuple[str, ...] = get_args(ResultStatus)


def shown_status(state: str) -> ResultStatus:
    return _SHOWN[state]


def states_for(status: str | None) -> list[str] | None:
    """The row states a `status` filter selects (None: every state); unknown → 400."""
    if status is None:
        return None
    if status not in STATUSES:
        raise ApiError(
            400,
            f"Invalid status filter '{status}'. Allowed values: " + ", ".join(STATUSES),
            code="invalid_request",
            param="status",
        )
    return sorted(state for state, shown in _SHOWN.items() if shown == status)


def result_line(
    *,
    request_id: str,
    custom_id: str | None,
    model: str,
    state: str,
    input_body: bytes | None,
    response_body: str | None,
    error: str | None,
) -> bytes:
    """One compact JSON line. The input body is the stored compact JSON, embedded as it is;
    the response body is parsed (kept as a JSON string when it is not JSON); the error is the
    raw error text (the failure envelope as stored)."""
    return jsonl(
        BatchResultLine(
            id=request_id,
            custom_id=custom_id,
            model=model,
            input_body=None if input_body is None else msgspec.Raw(input_body),
            response_body=json_or_text(response_body),
            error=error,
            status=shown_status(state),
        )
    )


def more_to_come(batch: Mapping[str, Any]) -> bool:
    """Whether a batch's results may still grow (``X-Incomplete``, responses-and-api §8.3):
    rows pending or in progress, rows the read model has not met yet (fewer known than the
    batch's total), or a batch that has neither populated its rows nor ended."""
    known = sum(batch[c] for c in ("pending", "in_progress", "completed", "failed", "canceled"))
    if batch["pending"] + batch["in_progress"] > 0 or known < batch["total"]:
        return True
    ended = any(batch[c] is not None for c in ("completed_at", "failed_at", "cancelled_at"))
    return batch["requests_started_at"] is None and not ended
