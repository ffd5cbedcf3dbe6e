"""Commands: requests to change state, published on ``cannonade.commands.v1``.

The HTTP API publishes them after validating a request; an upstream service may publish them
straight to Kafka, keyed by :func:`aggregate_id`. The commands agent applies the same rules as
the API and dead-letters what breaks them, with the reason.

No command carries user content: a file's line bodies are written first to the compacted bodies
topic (:mod:`schemas.bodies`) and each ``AppendFileLines`` names its chunk record. A file is
``AppendFileLines`` parts (lines 0, 1, 2… in order, one ``upload_id``) followed by one
``CreateFile`` with the same ``upload_id``; the file exists only once ``CreateFile`` is handled,
so a producer that dies half-way leaves no visible file, and a retried upload (another
``upload_id``) never mixes with the first. Parts may go out while the rest of the file is still
being checked; an upload that fails after some went out ends with ``AbandonUpload``, which
voids them.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas.bodies import BodyRef
from schemas.events import SCHEMA_VERSION, ChunkRef, LineRange
from schemas.types import (
    CustomId,
    FileName,
    MetadataKey,
    MetadataValue,
    Name,
    NonNegative,
    Text,
    Timestamp,
    Uuid,
    Window,
)

Purpose = Literal["batch"]
Metadata = Annotated[
    dict[MetadataKey, MetadataValue],
    msgspec.Meta(max_length=16),
]


class Command(
    msgspec.Struct, kw_only=True, frozen=True, tag_field="type", forbid_unknown_fields=True
):
    command_id: Text
    issued_at: Timestamp
    schema_version: int = SCHEMA_VERSION


class FileLine(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One line's metadata: [custom_id, method, path, model, body_size]."""

    custom_id: CustomId | None
    method: Literal["POST"]
    path: Name
    model: Name
    body_size: NonNegative


class AppendFileLines(Command, tag=True, frozen=True):
    """Lines ``first_line…`` of an upload, whose bodies are the chunk record ``body_key``
    (written before this command) at ``body``."""

    file_id: Uuid
    upload_id: Uuid
    first_line: NonNegative
    body_key: Name
    body: BodyRef
    lines: Annotated[list[FileLine], msgspec.Meta(min_length=1)]


class CreateFile(Command, tag=True, frozen=True):
    """Completes an upload: exactly ``line_count`` lines of ``upload_id`` must precede it."""

    file_id: Uuid
    upload_id: Uuid
    owner: Name
    filename: FileName
    purpose: Purpose
    bytes: NonNegative
    line_count: Annotated[int, msgspec.Meta(ge=1)]
    expires_at: Timestamp | None
    api_key_id: Uuid | None = None


class AbandonUpload(Command, tag=True, frozen=True):
    """Voids the parts ``upload_id`` appended: the upload failed before its ``CreateFile``.
    Ignored once the file exists (its lines are the file's then)."""

    file_id: Uuid
    upload_id: Uuid


class DeleteFile(Command, tag=True, frozen=True):
    file_id: Uuid


class CreateBatch(Command, tag=True, frozen=True):
    """Keyed by ``input_file_id``: it is checked against the file it names, in order after it."""

    batch_id: Uuid
    owner: Name
    input_file_id: Uuid
    endpoint: Name
    completion_window: Window
    metadata: Metadata | None = None
    api_key_id: Uuid | None = None


class ModelRun(msgspec.Struct, frozen=True, array_like=True):
    model: Name
    start: int
    end: int  # exclusive


class PopulateBatch(Command, tag=True, frozen=True):
    """Emitted by the commands agent itself once a CreateBatch passed: the batch's facts and
    its file's manifest (chunks and which model each line runs on)."""

    batch_id: Uuid
    input_file_id: Uuid
    owner: Name
    endpoint: Name
    completion_window: Window
    created_at: Timestamp
    expires_at: Timestamp
    headers: dict[str, str]
    chunks: list[ChunkRef]
    models: list[ModelRun]


class CancelBatch(Command, tag=True, frozen=True):
    batch_id: Uuid
    input_deleted: bool = False  # sent for a deletion of its input file: it never runs again


class SubmitRequest(Command, tag=True, frozen=True):
    """A flex request without a batch (responses §7.5–7.7): its body (after tool injection,
    with ``service_tier``/``background`` removed) was written first to the bodies topic as
    ``tpl:<request_id>``."""

    request_id: Uuid
    owner: Name
    model: Name
    path: Name
    body: BodyRef
    created_at: Timestamp
    background: bool = False
    api_key_id: Uuid | None = None


class RowRanges(msgspec.Struct, frozen=True, array_like=True):
    """Lines of a batch on one model: [model, [[start, end], ...]] (end exclusive)."""

    model: Name
    ranges: list[LineRange]


class RetryBatch(Command, tag=True, frozen=True):
    """Run a batch's failed rows again — and its canceled rows for a whole-batch retry (core
    §2.3 later rule). The caller names the rows as it saw them at ``retry_version``; a retry
    made against another version is refused, so two retries of one view never run twice."""

    batch_id: Uuid
    retry_version: Annotated[int, msgspec.Meta(ge=0)]
    scope: Literal["batch", "requests"]
    failed: list[RowRanges]
    canceled: list[RowRanges] = []


class DeleteBatch(Command, tag=True, frozen=True):
    batch_id: Uuid
    erase: bool = False  # a user's erasure: the metadata goes too


class CancelRequest(Command, tag=True, frozen=True):
    request_id: Uuid


class RetryRequest(Command, tag=True, frozen=True):
    request_id: Uuid


class DeleteRequest(Command, tag=True, frozen=True):
    """Right to erasure of a batchless request: the row and its bodies go."""

    request_id: Uuid


AnyCommand = (
    AppendFileLines
    | CreateFile
    | AbandonUpload
    | DeleteFile
    | CreateBatch
    | PopulateBatch
    | CancelBatch
    | SubmitRequest
    | RetryBatch
    | DeleteBatch
    | CancelRequest
    | RetryRequest
    | DeleteRequest
)


def aggregate_id(command: AnyCommand) -> str:
    """The Kafka key of a command: commands on one aggregate are handled in order."""
    if isinstance(command, AppendFileLines | CreateFile | AbandonUpload | DeleteFile):
        return command.file_id
    if isinstance(command, CreateBatch):
        return command.input_file_id
    if isinstance(command, SubmitRequest | CancelRequest | RetryRequest | DeleteRequest):
        return command.request_id
    return command.batch_id
