"""Batch creation checks, status derivation and the OpenAI batch object (responses-and-api §8.4).

Status follows §8.4's order with the project's decisions: a cancelled batch reads `cancelling`
until every row is terminal, a batch cancelled before population reads `cancelled` with
total 0, and a batch the expiry sweep marked reads `expired`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple, get_args

import msgspec

from projections.rules.content import unix_seconds
from schemas.api import (
    BatchCreate,
    BatchError,
    BatchErrors,
    BatchObject,
    BatchStatus,
    BatchStatusFilter,
    RequestCounts,
)
from schemas.errors import ApiError, invalid_request
from streams import validation

STATUS_FILTERS: tuple[str, ...] = get_args(BatchStatusFilter)

_UUID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|[0-9a-fA-F]{32}"
)


class CreateBatchRequest(msgspec.Struct, frozen=True):
    input_file_id: str  # lower-case hyphenated
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


_decode_create = msgspec.json.Decoder(BatchCreate).decode


def validate_create_batch(
    body: bytes, allowed_windows: Sequence[str], allowed_paths: Sequence[str]
) -> CreateBatchRequest:
    """Checks 1–3 and the format half of check 4; file lookup and line checks follow."""
    try:
        req = _decode_create(body)
    except msgspec.ValidationError as exc:
        raise invalid_request(f"Invalid request body: {exc}") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise invalid_request(f"Invalid JSON body: {exc}") from None
    validation.check_window(req.completion_window, allowed_windows)
    validation.check_endpoint(req.endpoint, allowed_paths)
    metadata = validation.check_metadata(req.metadata)
    if not _UUID.fullmatch(req.input_file_id):
        raise invalid_request("Invalid input_file_id format", param="input_file_id")
    return CreateBatchRequest(
        input_file_id=str(uuid.UUID(req.input_file_id)),
        endpoint=req.endpoint,
        completion_window=req.completion_window,
        metadata=metadata,
    )


class BatchFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What the read model knows of a batch.

    Counts are the request rows' real states (pending; in_progress = claimed + processing),
    without core §1.3.1's projected cancellation: a cancelled batch stays `cancelling` until
    its rows are actually terminal.
    """

    id: str
    endpoint: str
    input_file_id: str | None  # None once the input file is deleted
    completion_window: str
    output_file_id: str | None
    error_file_id: str | None
    metadata: dict[str, Any] | None
    created_at: datetime
    expires_at: datetime
    requests_started_at: datetime | None = None  # population time; None = unpopulated
    cancelling_at: datetime | None = None
    cancelled_at: datetime | None = None
    failed_at: datetime | None = None
    completed_at: datetime | None = None
    finalizing_at: datetime | None = None
    expired_at: datetime | None = None
    errors_message: str | None = None  # population failure
    total: int = 0
    pending: int = 0
    in_progress: int = 0
    completed: int = 0
    failed: int = 0
    canceled: int = 0


class Counts(NamedTuple):
    pending: int
    in_progress: int
    completed: int
    failed: int
    canceled: int


def shown_counts(live: Counts, frozen: tuple[int, int, int] | None) -> Counts:
    """Core §1.3.1: once a batch's counts are frozen (§5.2.5) it reports the stored
    (completed, failed, canceled), with nothing pending or in progress; before, its rows'."""
    if frozen is None:
        return live
    return Counts(0, 0, *frozen)


def derive_status(f: BatchFacts) -> BatchStatus:
    populated = f.requests_started_at is not None
    # Rows reach the read model after the batch says it is populated: until every row is
    # known, a batch with nothing pending yet is not finished.
    ended = f.completed + f.failed + f.canceled
    finished = populated and f.pending == 0 and f.in_progress == 0 and ended >= f.total
    if f.cancelling_at is not None:
        # Population after a cancel is a no-op, so an unpopulated cancelled batch is done.
        return "cancelled" if finished or not populated else "cancelling"
    if not populated:
        return "failed" if f.failed_at is not None else "validating"
    if f.expired_at is not None:
        return "expired"
    if finished:
        if f.failed == f.total:
            return "failed"
        if f.completed_at is not None:
            return "completed"
        if f.failed_at is not None:
            return "failed"
        return "finalizing"
    return "in_progress"


def _ts(at: datetime | None) -> int | None:
    return None if at is None else unix_seconds(at)


def batch_object(f: BatchFacts) -> BatchObject:
    status = derive_status(f)
    populated = f.requests_started_at is not None
    errors = None
    if f.errors_message is not None:
        error = BatchError(code="population_failed", line=None, message=f.errors_message, param=None)  # fmt: skip
        errors = BatchErrors(object="list", data=[error])
    # Terminal stamps show only with their status, so a batch never reads as two outcomes.
    return BatchObject(
        id=f.id,
        object="batch",
        endpoint=f.endpoint,
        errors=errors,
        input_file_id=f.input_file_id or "",
        completion_window=f.completion_window,
        status=status,
        output_file_id=f.output_file_id,
        error_file_id=f.error_file_id,
        created_at=unix_seconds(f.created_at),
        in_progress_at=None if status == "validating" else _ts(f.requests_started_at),
        expires_at=unix_seconds(f.expires_at),
        finalizing_at=_ts(f.finalizing_at) if status in ("finalizing", "completed") else None,
        completed_at=_ts(f.completed_at) if status == "completed" else None,
        failed_at=_ts(f.failed_at) if status == "failed" else None,
        expired_at=_ts(f.expired_at) if status == "expired" else None,
        cancelling_at=_ts(f.cancelling_at),
        cancelled_at=_ts(f.cancelled_at) if status == "cancelled" else None,
        request_counts=RequestCounts(
            total=f.total if populated else 0,
            completed=f.completed if populated else 0,
            failed=f.failed if populated else 0,
        ),
        metadata=f.metadata,
    )


def check_status_filter(status: str) -> str:
    if status not in STATUS_FILTERS:
        raise ApiError(
            400,
            f"Invalid status filter '{status}'. Allowed values: " + ", ".join(STATUS_FILTERS),
            code="invalid_request",
            param="status",
        )
    return status
