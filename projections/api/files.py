"""``/v1/files``: upload (validated, then published), list, get, content, delete.

An upload's lines go out in parts while the rest is parsed (:mod:`projections.api.upload_parts`);
the file is created only once every line has passed, and an upload that fails part-way voids
what went out, so a rejected file is never visible. With an ``Idempotency-Key`` header the
file id is derived from the key, so a retried upload answers the file the first attempt
created instead of creating a second one (409 once that file is deleted or expired).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, TypeVar, get_args

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from cannonade.config import Config, ModelKind
from projections import queries
from projections.api.app import Context, context, json_response, principal
from projections.api.intake import model_kind
from projections.api.upload_parts import UploadParts
from projections.rules.content import (
    error_line,
    file_bytes,
    file_object,
    input_line,
    output_line,
)
from projections.rules.results import more_to_come
from projections.rules.upload import (
    UploadLimits,
    parse_chunks,
    validate_expires_after,
    validate_purpose,
)
from schemas import bodies, ids
from schemas.api import (
    MAX_PAGE,
    MAX_QUERY_INT,
    BatchList,
    DeletedFile,
    FileList,
    FileObject,
    FileOrder,
)
from schemas.api_webhooks import WebhookDeliveryList, WebhookEndpointList
from schemas.commands import CreateFile, DeleteFile
from schemas.errors import ApiError, invalid_request, not_found
from schemas.types import MAX_FILENAME
from streams import validation

# Chunk records stay well under the message limit; a larger line travels alone.
CHUNK_BYTES = 512 * 1024
PAGE = 500
Page = TypeVar("Page", FileList, BatchList, WebhookEndpointList, WebhookDeliveryList)


def routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/files", upload)
    router.add_get("/v1/files", list_files)
    router.add_get("/v1/files/{id}", get_file)
    router.add_get("/v1/files/{id}/content", content)
    router.add_delete("/v1/files/{id}", delete_file)


def parse_uuid(value: str, message: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ApiError(400, message, code="invalid_request") from None


def file_json(row: Any) -> FileObject:
    size = file_bytes(
        row["purpose"],
        row["bytes"],
        completed=row["completed"],
        response_bytes=row["response_bytes"],
        failed=row["failed"],
        error_bytes=row["error_bytes"],
    )
    return file_object(
        file_id=row["id"],
        bytes_=size,
        created_at=row["created_at"],
        filename=row["filename"],
        purpose=row["purpose"],
        expires_at=row["expires_at"],
    )


# The form fields an upload reads besides the file; any other part is read past, not kept.
_FORM_FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")
_FIELD_BYTES = 4096


async def _read_multipart(request: web.Request, limit: int) -> dict[str, Any]:
    """The upload's file and form fields. Every part counts against ``limit``, however the
    body is framed (a chunked one has no Content-Length to refuse up front)."""
    fields: dict[str, Any] = {}
    room = limit + len(_FORM_FIELDS) * _FIELD_BYTES
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise invalid_request("Invalid multipart request: a nested multipart part")
            if part.name in _FORM_FIELDS:
                data = await _part_bytes(part, _FIELD_BYTES)
                if len(data) > _FIELD_BYTES:
                    raise invalid_request(f"Invalid multipart request: '{part.name}' is too long")
                fields[part.name] = part.decode(data).decode(part.get_charset(default="utf-8"))
            else:
                data = await _part_bytes(part, room)
                if part.name == "file":
                    fields["file"], fields["filename"] = data, part.filename
            room -= len(data)
            if room < 0:
                raise ApiError(
                    413,
                    f"File exceeds the maximum allowed size of {limit} bytes",
                    code="file_too_large",
                )
    except (
        ValueError,
        AssertionError,
        LookupError,
        UnicodeDecodeError,
        HttpProcessingError,
    ) as exc:
        raise invalid_request(f"Invalid multipart request: {exc}") from None
    return fields


async def _part_bytes(part: BodyPartReader, cap: int) -> bytes:
    """The part's bytes, read no further than just past ``cap``."""
    data = bytearray()
    while len(data) <= cap and (chunk := await part.read_chunk(1 << 16)):
        data += chunk
    return bytes(data)


def _limits(config: Config) -> UploadLimits:
    return UploadLimits(
        max_file_size=config.api.max_file_size,
        max_requests_per_file=config.api.max_requests_per_file,
        max_request_body_size=config.api.max_request_body_size,
        allowed_url_paths=tuple(config.api.allowed_url_paths),
    )


async def upload(request: web.Request) -> web.Response:
    ctx, who = context(request), principal(request)
    limits = _limits(ctx.config)
    if (request.content_length or 0) > limits.max_file_size + 10 * 1024:
        raise ApiError(
            413,
            f"File exceeds the maximum allowed size of {limits.max_file_size} bytes",
            code="file_too_large",
        )
    key = request.headers.get("Idempotency-Key")
    file_id = ids.file_id_for(who.user, key) if key else str(uuid.uuid4())
    if key:
        existing = await queries.get_file(ctx.pool, file_id, who.user)
        if existing is not None:
            return json_response(file_json(existing), 201)
        if await queries.file_exists(ctx.pool, file_id):
            # The key's file is gone (deleted or expired): its outcome cannot be answered
            # again, and a new file under the old id would resurrect it.
            raise ApiError(
                409,
                f"The file created with this Idempotency-Key ({file_id}) has been deleted or"
                " has expired; send a new key",
                code="idempotency_key_reused",
            )
    fields = await _read_multipart(request, limits.max_file_size)
    now = datetime.now(UTC)
    validate_purpose(fields.get("purpose"))
    expires_at = validate_expires_after(
        fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]"), now
    )
    if "file" not in fields:
        raise invalid_request("No file field found in multipart upload")
    filename = fields.get("filename") or f"upload-{file_id}"
    validation.check_storable(filename, "filename")
    if len(filename) > MAX_FILENAME:  # the commands contract's bound (FileName)
        raise invalid_request(
            f"Invalid 'filename': at most {MAX_FILENAME} characters", param="filename"
        )
    raw: bytes = fields["file"]

    def kind(model: str) -> ModelKind | None:
        return model_kind(ctx.config, model, who.user)

    parts = UploadParts(ctx.publisher, file_id, str(uuid.uuid4()), now)
    parsed = parse_chunks(raw, limits, kind, CHUNK_BYTES)
    try:
        # Parsed off the event loop, a chunk at a time: the chunks already parsed travel
        # meanwhile, and the API goes on serving other requests.
        while (lines := await asyncio.to_thread(next, parsed, None)) is not None:
            parts.add(lines)
        await parts.finish(
            CreateFile(
                command_id=ids.new_id(),
                issued_at=now,
                file_id=file_id,
                upload_id=parts.upload_id,
                owner=who.user,
                filename=filename,
                purpose="batch",
                bytes=len(raw),
                line_count=parts.lines,
                expires_at=expires_at,
                api_key_id=who.key_id,
            )
        )
    except BaseException:  # a refused line, a failed send, or the request cancelled
        await parts.abandon()
        raise
    await ctx.wait_for(lambda: queries.file_exists(ctx.pool, file_id), "the file")
    row = await queries.get_file(ctx.pool, file_id, who.user)
    if row is None:
        raise not_found("File", file_id)
    return json_response(file_json(row), 201)


async def list_files(request: web.Request) -> web.Response:
    ctx, who, q = context(request), principal(request), request.query
    order = query_text(q, "order") or "desc"
    if order not in get_args(FileOrder):
        raise invalid_request("Order must be 'asc' or 'desc'", param="order")
    limit = list_limit(q, default=20)
    rows = await queries.list_files(
        ctx.pool,
        who.user,
        after=optional_uuid(query_text(q, "after")),
        limit=limit + 1,
        ascending=order == "asc",
        purpose=query_text(q, "purpose"),
        search=query_text(q, "search"),
    )
    return json_response(list_page(FileList, [file_json(r) for r in rows], limit))


def query_text(q: Any, name: str) -> str | None:
    """A text query parameter; text the read model cannot hold is a client error."""
    value = q.get(name)
    if value is not None:
        validation.check_storable(value, name)
    return value  # type: ignore[no-any-return]


def query_int(q: Any, name: str, default: int, *, low: int = 0, high: int = MAX_QUERY_INT) -> int:
    raw = q.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise invalid_request(f"{name} must be an integer between {low} and {high}", param=name)
    return value


def list_limit(q: Any, default: int) -> int:
    """Listing pages hold 1 to MAX_PAGE items; out-of-range values are clamped, as OpenAI
    does."""
    raw = q.get("limit")
    if raw is None:
        return default
    try:
        return max(1, min(int(raw), MAX_PAGE))
    except ValueError:
        raise invalid_request("limit must be an integer", param="limit") from None


def optional_uuid(raw: str | None) -> str | None:
    """A cursor that is not a UUID is ignored, as the reference does."""
    if raw is None:
        return None
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        return None


def list_page(page: type[Page], items: list[Any], limit: int) -> Page:
    """A cursor page of ``items`` read one past ``limit`` (which tells whether more exist)."""
    data = items[:limit]
    first, last = (data[0].id, data[-1].id) if data else (None, None)
    return page(object="list", data=data, has_more=len(items) > limit, first_id=first, last_id=last)


async def _owned_file(request: web.Request) -> Any:
    ctx, who = context(request), principal(request)
    file_id = parse_uuid(request.match_info["id"], "Invalid file ID format")
    row = await queries.get_file(ctx.pool, file_id, who.user)
    if row is None:
        raise not_found("File", file_id)
    return row


async def get_file(request: web.Request) -> web.Response:
    return json_response(file_json(await _owned_file(request)))


async def delete_file(request: web.Request) -> web.Response:
    ctx = context(request)
    row = await _owned_file(request)
    await ctx.publisher.commands(
        [DeleteFile(command_id=ids.new_id(), issued_at=datetime.now(UTC), file_id=row["id"])]
    )
    await ctx.wait_for(lambda: queries.file_deleted(ctx.pool, row["id"]), "the deletion")
    return json_response(DeletedFile(id=row["id"], object="file", deleted=True))


async def content(request: web.Request) -> web.StreamResponse:
    """JSONL lines. With ``limit`` one page, whose headers say whether more lines exist;
    without, the whole file, streamed page by page."""
    ctx, q = context(request), request.query
    row = await _owned_file(request)
    skip = query_int(q, "skip", 0)
    limit = None if q.get("limit") is None else query_int(q, "limit", 0)
    search = query_text(q, "search") or None
    incomplete = False
    state = "completed" if row["purpose"] == "batch_output" else "failed"
    if row["purpose"] in ("batch_output", "batch_error"):
        batch = await queries.batch_by_result_file(ctx.pool, row["id"])
        incomplete = batch is not None and more_to_come(batch)
        # A result's body travels on its own topic and may trail its row by a poll.
        await ctx.wait_for(lambda: _no_missing(ctx, row["batch_id"], state), "result bodies")
        lines = _result_lines(ctx, row["batch_id"], state, skip, limit, search)
    else:
        lines = _input_lines(ctx, row["id"], skip, limit, search)
    return await serve_jsonl(request, lines, skip=skip, limit=limit, incomplete=incomplete)


async def serve_jsonl(
    request: web.Request,
    lines: AsyncIterator[bytes],
    *,
    skip: int,
    limit: int | None,
    incomplete: bool,
) -> web.StreamResponse:
    """Answer JSONL lines read page by page (no database connection is held while the client
    reads), within the caller's download slots. With ``limit`` one page, whose headers say
    whether more lines exist (``X-Incomplete``) and where it ended (``X-Last-Line``); without,
    every line, streamed. A failure after the first byte resets the connection, so a truncated
    download can never pass for a whole one."""
    ctx, who = context(request), principal(request)
    if ctx.downloads.get(who.user, 0) >= ctx.config.api.downloads_per_user:
        raise ApiError(
            429,
            f"Too many downloads in progress for this user (at most "
            f"{ctx.config.api.downloads_per_user} at once)",
            code="rate_limit_exceeded",
        )
    ctx.downloads[who.user] = ctx.downloads.get(who.user, 0) + 1
    try:
        headers = {"Content-Type": "application/x-ndjson"}
        if limit is not None:
            page = [line async for line in _take(lines, limit + 1)]
            more = len(page) > limit
            page = page[:limit]
            headers["X-Incomplete"] = str(incomplete or more).lower()
            headers["X-Last-Line"] = str(skip + len(page))
            return web.Response(body=b"".join(page), headers=headers)
        headers["X-Incomplete"] = str(incomplete).lower()
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        try:
            async for line in lines:
                await response.write(line)
        except Exception:
            if request.transport is not None:
                request.transport.abort()
            raise
        await response.write_eof()
        return response
    finally:
        left = ctx.downloads[who.user] - 1
        if left:
            ctx.downloads[who.user] = left
        else:
            del ctx.downloads[who.user]


def chunk_line_body(
    decoded: dict[str, bodies.TemplateChunk], body_key: str, line_number: int
) -> bytes | None:
    """A line's body from its decoded chunk record (``…:<first line>`` names the chunk's first
    line); None when the chunk is gone (erased)."""
    chunk = decoded.get(body_key)
    if chunk is None:
        return None
    first = int(body_key.rsplit(":", 1)[1])
    return bytes(chunk.lines[line_number - first].body)


class Window:
    """Page sizes for reading ``limit`` lines and one more (the one that tells a page of
    ``limit`` whether more lines exist), or every line when ``limit`` is None."""

    def __init__(self, limit: int | None) -> None:
        self.left = None if limit is None else limit + 1

    def size(self) -> int:
        return PAGE if self.left is None else min(PAGE, self.left)

    def more(self, got: int, size: int) -> bool:
        """Whether to read on after a page that answered ``got`` of the ``size`` rows asked."""
        if self.left is not None:
            self.left -= got
        return got == size and (self.left is None or self.left > 0)


async def _take(lines: AsyncIterator[bytes], count: int) -> AsyncIterator[bytes]:
    if count <= 0:
        return
    async for line in lines:
        yield line
        count -= 1
        if count <= 0:
            return


async def _input_lines(
    ctx: Context, file_id: str, skip: int, limit: int | None, search: str | None
) -> AsyncIterator[bytes]:
    after: int | None = None
    window = Window(limit)
    while True:
        size = window.size()
        rows, chunk_bodies = await queries.input_page(
            ctx.pool, file_id, after_line=after, skip=skip if after is None else 0,
            limit=size, search=search,
        )  # fmt: skip
        decoded = {k: bodies.chunk_decoder.decode(v) for k, v in chunk_bodies.items()}
        for r in rows:
            body = chunk_line_body(decoded, r["body_key"], r["line_number"])
            if body is None:
                raise LookupError(f"the body of line {r['line_number']} is gone")
            yield input_line(r["custom_id"], r["method"], r["path"], body)
        if not window.more(len(rows), size):
            return
        after = rows[-1]["line_number"]


async def _result_lines(
    ctx: Context, batch_id: str, state: str, skip: int, limit: int | None, search: str | None
) -> AsyncIterator[bytes]:
    after: tuple[datetime, str] | None = None
    window = Window(limit)
    while True:
        size = window.size()
        rows = await queries.result_page(
            ctx.pool, batch_id, state, after=after, skip=skip if after is None else 0,
            limit=size, search=search,
        )  # fmt: skip
        for r in rows:
            body = None if r["body"] is None else bytes(r["body"]).decode("utf-8", "replace")
            if state == "completed":
                yield output_line(r["id"], r["custom_id"], r["response_status"], body)
            else:
                yield error_line(r["id"], r["custom_id"], body)
        if not window.more(len(rows), size):
            return
        after = (rows[-1]["at"], rows[-1]["id"])


async def _no_missing(ctx: Context, batch_id: str, state: str) -> bool:
    return await queries.results_missing_bodies(ctx.pool, batch_id, state) == 0
