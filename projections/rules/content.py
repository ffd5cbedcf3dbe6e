"""Wire shapes of file objects and JSONL lines (core §1.3.4, §2.10; responses-and-api §8.3, §8.5).

Every line is compact JSON ending with `\\n`: bodies are re-encoded, so pretty-printed upstream
responses cannot break a download into extra lines.
"""

from __future__ import annotations

import calendar
from datetime import datetime
from typing import Any

import msgspec

from schemas.api import (
    FileObject,
    FilePurpose,
    InputLine,
    OutputLine,
    OutputLineError,
    OutputLineResponse,
)

# Per-row envelope overhead of a batch file's size estimate, as the reference computes it
# (core §1.3.4).
_ROW_OVERHEAD = {"batch_output": 181, "batch_error": 160}

_encoder = msgspec.json.Encoder()


def unix_seconds(at: datetime) -> int:
    """Whole Unix seconds; a naive datetime is read as UTC, never as local time."""
    return calendar.timegm(at.utctimetuple())


def json_or_text(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return text


def jsonl(line: msgspec.Struct) -> bytes:
    buf = bytearray()
    _encoder.encode_into(line, buf)
    buf += b"\n"
    return bytes(buf)


def output_line(
    request_id: str, custom_id: str | None, status_code: int | None, body_text: str | None
) -> bytes:
    response = OutputLineResponse(
        status_code=200 if status_code is None else status_code,
        request_id=None,
        body=json_or_text(body_text),
    )
    return jsonl(OutputLine(f"batch_req_{request_id}", custom_id, response, None))


def error_line(request_id: str, custom_id: str | None, error_text: str | None) -> bytes:
    message = "Unknown error" if error_text is None else error_text
    return jsonl(
        OutputLine(f"batch_req_{request_id}", custom_id, None, OutputLineError(None, message))
    )


def input_line(custom_id: str | None, method: str, url: str, body: bytes) -> bytes:
    """An input file line; ``body`` is the stored compact JSON, embedded as it is."""
    return jsonl(InputLine(custom_id, method, url, msgspec.Raw(body)))


def file_bytes(
    purpose: str,
    stored: int | None,
    *,
    completed: int,
    response_bytes: int,
    failed: int,
    error_bytes: int,
) -> int:
    """A file object's ``bytes``: an upload's stored size; a batch's output and error files
    the estimate from its counters, which grows while the batch runs."""
    if purpose == "batch_output":
        rows, body_bytes = completed, response_bytes
    elif purpose == "batch_error":
        rows, body_bytes = failed, error_bytes
    else:
        return stored or 0
    return 0 if rows == 0 else body_bytes + _ROW_OVERHEAD[purpose] * rows


def virtual_file_names(batch_id: str) -> tuple[str, str]:
    """(output file name, error file name) of a batch."""
    return f"batch-{batch_id}-output.jsonl", f"batch-{batch_id}-error.jsonl"


def file_object(
    *,
    file_id: str,
    bytes_: int,
    created_at: datetime,
    filename: str,
    purpose: FilePurpose,
    expires_at: datetime | None,
) -> FileObject:
    return FileObject(
        id=file_id,
        object="file",
        bytes=bytes_,
        created_at=unix_seconds(created_at),
        filename=filename,
        purpose=purpose,
        status="processed",
        expires_at=None if expires_at is None else unix_seconds(expires_at),
    )
