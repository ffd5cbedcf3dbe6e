"""User content on the compacted bodies topic: where it lives and how it is framed.

Prompt and completion text never travels on a lifecycle or command topic. It is written once to
``cannonade.bodies.v1`` (compacted), keyed per piece of content so erasure is a tombstone, and
everything else refers to it:

- ``tplc:<file_id>:<upload_id>:<first_line>`` — a chunk of an uploaded file's lines, as JSON
  ``{"lines": [[custom_id, <body>], ...]}`` with each body embedded as raw JSON (no escaping,
  so a body takes its own size on the topic);
- ``tpl:<request_id>`` — the body of a batchless request, raw;
- ``res:<request_id>`` / ``err:<request_id>`` — a response body / error envelope, raw;
- ``sreq:<step_id>`` / ``sres:<step_id>`` / ``serr:<step_id>`` — a chain step's request
  payload, response payload and error, JSON.

A :class:`BodyRef` (partition, offset, index) names one template body: executors read it
straight from the topic by offset, so the write path never reads the read model. Records keep
their offsets through compaction; a ref whose record was tombstoned reads as erased.
"""

from __future__ import annotations

import zlib

import msgspec

from schemas.topics import MAX_MESSAGE_BYTES

CHUNK = "tplc"
TEMPLATE = "tpl"
RESULT = "res"
ERROR = "err"
STEP_REQUEST = "sreq"
STEP_RESULT = "sres"
STEP_ERROR = "serr"
#: The largest body one record of the bodies topic carries, with room for its key: a larger
#: answer cannot be kept (its send would fail every time).
MAX_BODY_BYTES = MAX_MESSAGE_BYTES - 64 * 1024


class BodyRef(msgspec.Struct, frozen=True, array_like=True):
    """A template body's record on the bodies topic; ``index`` is the line's position in a
    chunk record, -1 when the record is the body itself."""

    partition: int
    offset: int
    index: int = -1


class ChunkLine(msgspec.Struct, frozen=True, array_like=True):
    custom_id: str | None
    body: msgspec.Raw


class TemplateChunk(msgspec.Struct, frozen=True):
    lines: list[ChunkLine]


chunk_decoder = msgspec.json.Decoder(TemplateChunk)
_encoder = msgspec.json.Encoder()


def encode_chunk(lines: list[tuple[str | None, bytes]]) -> bytes:
    return _encoder.encode(TemplateChunk([ChunkLine(c, msgspec.Raw(b)) for c, b in lines]))


def chunk_key(file_id: str, upload_id: str, first_line: int) -> str:
    return f"{upload_chunks(file_id, upload_id)}{first_line}"


def upload_chunks(file_id: str, upload_id: str) -> str:
    """The prefix of every chunk key of one upload."""
    return f"{CHUNK}:{file_id}:{upload_id}:"


def chunk_upload(key: str) -> tuple[str, str] | None:
    """The (file id, upload id) a :func:`chunk_key` names; None for a key of another shape
    (the bodies topic takes what producers write)."""
    parts = key.split(":")
    if len(parts) != 4 or parts[0] != CHUNK:
        return None
    return parts[1], parts[2]


def key(kind: str, ref: str) -> str:
    return f"{kind}:{ref}"


def partition_for(aggregate_id: str, partitions: int) -> int:
    """The partition of every body record of an aggregate (a file's chunks, a request's
    bodies): stable, so tombstones land where the record is, and a file's chunks stay in
    one partition in line order, which executors read ahead."""
    return zlib.crc32(aggregate_id.encode()) % partitions
