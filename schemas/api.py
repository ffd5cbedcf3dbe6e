"""HTTP API objects of files and batches, as the OpenAI Files and Batches APIs define them,
the error envelope, and the parameters of their routes.

The handlers encode these structs and check their parameters against these declarations;
``schemas.openapi`` builds the OpenAPI document from them, so what is served and what is
documented cannot drift apart. The objects are also exported as JSON Schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

#: Query integers larger than this are a mistake, not a request.
MAX_QUERY_INT = 2**62
#: Listing pages of files, batches and webhook deliveries hold 1 to this many items.
MAX_PAGE = 100
#: What one retry-requests call may name: one body, one command.
MAX_REQUEST_IDS = 50_000
#: An uploaded file's `expires_after[seconds]` bounds and default.
MIN_EXPIRES_AFTER = 3600
MAX_EXPIRES_AFTER = 30 * 24 * 3600
DEFAULT_EXPIRES_AFTER = MAX_EXPIRES_AFTER
#: A batch's metadata: at most this many pairs, keys and values at most this long.
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512

Cursor = Annotated[str, msgspec.Meta(description="The id of the last item of the previous page")]
PageLimit = Annotated[
    int, msgspec.Meta(description=f"Items per page, 1 to {MAX_PAGE}; values outside are clamped")
]
Skip = Annotated[int, msgspec.Meta(ge=0, le=MAX_QUERY_INT, description="Lines to skip")]
LineLimit = Annotated[
    int,
    msgspec.Meta(
        ge=0, le=MAX_QUERY_INT, description="At most this many lines; absent: every line, streamed"
    ),
]
LineSearch = Annotated[str, msgspec.Meta(description="Only lines whose custom_id contains this")]
Flag = Annotated[bool, msgspec.Meta(description="true or false (1 or 0 also read)")]
TimeBound = Annotated[
    str,
    msgspec.Meta(
        description="An RFC 3339 timestamp (UTC when it has no offset)",
        extra_json_schema={"format": "date-time"},
    ),
]


# -- errors ------------------------------------------------------------------------------------


class ErrorBody(msgspec.Struct, forbid_unknown_fields=True):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorEnvelope(msgspec.Struct, forbid_unknown_fields=True):
    """The OpenAI error envelope: every error Cannonade answers has this shape."""

    error: ErrorBody


# -- files -------------------------------------------------------------------------------------

FilePurpose = Literal["batch", "batch_output", "batch_error"]
FileOrder = Literal["asc", "desc"]


class FileObject(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: FilePurpose
    status: Literal["processed", "error", "deleted", "expired"]
    expires_at: int | None


class DeletedFile(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    object: Literal["file"]
    deleted: bool


class FileList(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A page; `first_id` and `last_id` are absent when it is empty."""

    object: Literal["list"]
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileUpload(msgspec.Struct, forbid_unknown_fields=True):
    """A `multipart/form-data` upload: JSONL, one request per line
    (`{"custom_id", "method": "POST", "url", "body"}`). Send an `Idempotency-Key` header to
    make a retried upload answer the file the first attempt created."""

    file: Annotated[
        str,
        msgspec.Meta(description="The JSONL file"),
    ]
    purpose: Literal["batch"] = "batch"
    expires_after_anchor: Literal["created_at"] | None = msgspec.field(
        name="expires_after[anchor]", default=None
    )
    expires_after_seconds: (
        Annotated[int, msgspec.Meta(ge=MIN_EXPIRES_AFTER, le=MAX_EXPIRES_AFTER)] | None
    ) = msgspec.field(name="expires_after[seconds]", default=None)


class FileListQuery(msgspec.Struct, forbid_unknown_fields=True):
    after: Cursor | None = None
    limit: PageLimit = 20
    order: FileOrder = "desc"
    purpose: Annotated[str, msgspec.Meta(description="Only files of this purpose")] | None = None
    search: Annotated[str, msgspec.Meta(description="Only files whose name contains this")] | None = None  # fmt: skip


class LinesQuery(msgspec.Struct, forbid_unknown_fields=True):
    """Pages of JSONL lines: with `limit`, one page whose `X-Incomplete` header says whether
    more lines exist and `X-Last-Line` where it ended; without, every line, streamed."""

    skip: Skip = 0
    limit: LineLimit | None = None
    search: LineSearch | None = None


class InputLine(msgspec.Struct, forbid_unknown_fields=True):
    """One line of an input file's content."""

    custom_id: str | None
    method: str
    url: str
    body: Annotated[msgspec.Raw, msgspec.Meta(extra_json_schema={"type": "object"})]


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


# -- batches -----------------------------------------------------------------------------------


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
BatchStatusFilter = Literal["in_progress", "completed", "failed", "cancelled", "expired"]


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


class BatchList(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A page; `first_id` and `last_id` are absent when it is empty."""

    object: Literal["list"]
    data: list[BatchObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class BatchCreate(msgspec.Struct):
    """Creates a batch of an uploaded file's requests; every line's url must be `endpoint`."""

    input_file_id: str
    endpoint: Annotated[str, msgspec.Meta(description="One of the server's allowed url paths")]
    completion_window: Annotated[
        str, msgspec.Meta(description="One of the server's allowed windows, e.g. `24h`")
    ]
    # Any here, checked by hand so each violation gets its own message.
    metadata: Annotated[
        Any,
        msgspec.Meta(
            description="String pairs",
            extra_json_schema={
                "anyOf": [
                    {
                        "type": "object",
                        "maxProperties": MAX_METADATA_PAIRS,
                        "propertyNames": {"maxLength": MAX_METADATA_KEY},
                        "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE},
                    },
                    {"type": "null"},
                ]
            },
        ),
    ] = None


class BatchListQuery(msgspec.Struct, forbid_unknown_fields=True):
    after: Cursor | None = None
    limit: PageLimit = 20
    status: BatchStatusFilter | None = None
    completion_window: Annotated[str, msgspec.Meta(description="Comma-separated windows")] | None = None  # fmt: skip
    created_after: TimeBound | None = None
    created_before: TimeBound | None = None
    active_first: Flag = False


class RetryRequestsBody(msgspec.Struct):
    """The failed rows of a batch to run again: ids as `batch_req_<uuid>` (as output and error
    lines name them) or the bare uuid."""

    request_ids: Annotated[list[str], msgspec.Meta(min_length=1, max_length=MAX_REQUEST_IDS)]


ResultStatus = Literal["pending", "in_progress", "completed", "failed", "canceled"]


class ResultsQuery(msgspec.Struct, forbid_unknown_fields=True):
    """Pages of a batch's rows in line order, as `LinesQuery` pages file content."""

    status: ResultStatus | None = None
    search: LineSearch | None = None
    skip: Skip = 0
    limit: LineLimit | None = None


class BatchResultLine(msgspec.Struct, forbid_unknown_fields=True):
    """One row of a batch with its input, its result or error, and its status."""

    id: str
    custom_id: str | None
    model: str
    input_body: Annotated[msgspec.Raw, msgspec.Meta(extra_json_schema={"type": "object"})] | None
    response_body: Any  # the upstream body as JSON, or the raw text as a JSON string
    error: str | None  # the failure envelope as stored
    status: ResultStatus


API_OBJECTS = (FileObject, DeletedFile, FileList, BatchObject, BatchList, ErrorEnvelope, OutputLine)
