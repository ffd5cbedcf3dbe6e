"""Commands: requests to change state, published on ``cannonade.commands.v1``.

The HTTP API publishes them after validating a request; an upstream service may publish them
straight to Kafka. The commands agent turns each into events (or a dead letter). A file travels
as ``AppendFileLines`` parts followed by one ``CreateFile``; the file exists only once
``CreateFile`` is handled, so a producer that dies half-way leaves no visible file.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from schemas.events import SCHEMA_VERSION


class Command(msgspec.Struct, kw_only=True, frozen=True, tag_field="type"):
    command_id: str
    issued_at: datetime
    schema_version: int = SCHEMA_VERSION


class FileLine(msgspec.Struct, frozen=True, array_like=True):
    custom_id: str | None
    method: str
    path: str
    model: str
    body: str  # sanitised JSON text


class AppendFileLines(Command, tag=True, frozen=True):
    file_id: str
    first_line: int
    lines: list[FileLine]


class CreateFile(Command, tag=True, frozen=True):
    file_id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    line_count: int
    expires_at: datetime | None
    api_key_id: str | None = None


class DeleteFile(Command, tag=True, frozen=True):
    file_id: str


class CreateBatch(Command, tag=True, frozen=True):
    batch_id: str
    owner: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    api_key_id: str | None = None


class CancelBatch(Command, tag=True, frozen=True):
    batch_id: str


AnyCommand = AppendFileLines | CreateFile | DeleteFile | CreateBatch | CancelBatch


def aggregate_id(command: AnyCommand) -> str:
    """The Kafka key of a command: commands on one aggregate are handled in order."""
    if isinstance(command, AppendFileLines | CreateFile | DeleteFile):
        return command.file_id
    return command.batch_id
