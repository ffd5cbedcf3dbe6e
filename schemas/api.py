"""HTTP API objects, as the OpenAI Files and Batches APIs define them.

The handlers build these shapes in ``projections.rules``; these structs are the published
contract (exported as JSON Schema) and the integration tests check responses against them.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class FileObject(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output", "batch_error"]
    status: Literal["processed", "error", "deleted", "expired"]
    expires_at: int | None


class DeletedFile(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchError(msgspec.Struct, forbid_unknown_fields=True):
    code: str | None
    line: int | None
    message: str
    param: str | None


class BatchErrors(msgspec.Struct, forbid_unknown_fields=True):
    object: Literal["list"]
    data: list[BatchError]


class RequestCounts(msgspec.Struct, forbid_unknown_fields=True):
    total: int
    completed: int
    failed: int


BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]


class BatchObject(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    object: Literal["batch"]
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None


class FileList(msgspec.Struct, forbid_unknown_fields=True):
    object: Literal["list"]
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class BatchList(msgspec.Struct, forbid_unknown_fields=True):
    object: Literal["list"]
    data: list[BatchObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class ErrorBody(msgspec.Struct, forbid_unknown_fields=True):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorEnvelope(msgspec.Struct, forbid_unknown_fields=True):
    error: ErrorBody


class OutputLineResponse(msgspec.Struct, forbid_unknown_fields=True):
    status_code: int
    request_id: None
    body: Any  # the upstream body as JSON, or the raw text as a JSON string


class OutputLineError(msgspec.Struct, forbid_unknown_fields=True):
    code: None
    message: str


class OutputLine(msgspec.Struct, forbid_unknown_fields=True):
    """One line of a batch's output or error file."""

    id: str
    custom_id: str | None
    response: OutputLineResponse | None
    error: OutputLineError | None


API_OBJECTS = (FileObject, DeletedFile, FileList, BatchObject, BatchList, ErrorEnvelope, OutputLine)
