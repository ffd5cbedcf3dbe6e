"""``/v1/files``: upload (validated, then published as commands), list, get, content, delete."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import BodyPartReader, web

from cannonade.config import Config, ModelKind
from projections import queries
from projections.api.app import context, json_response, principal
from projections.rules.content import error_line, file_object, input_line, output_line
from schemas.errors import ApiError, not_found
from projections.rules.upload import (
    ParsedUpload,
    UploadLimits,
    parse_upload,
    validate_expires_after,
    validate_purpose,
)
from schemas import ids
from schemas.commands import AnyCommand, AppendFileLines, CreateFile, DeleteFile, FileLine

# Upload parts stay well under the broker's message limit; one oversized line travels alone.
PART_BYTES = 512 * 1024
CONTENT_PAGE = 1000


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


def file_json(row: Any) -> dict[str, Any]:
    return file_object(
        file_id=row["id"],
        bytes_=row["bytes"],
        created_at=row["created_at"],
        filename=row["filename"],
        purpose=row["purpose"],
        expires_at=row["expires_at"],
    )


async def _read_multipart(request: web.Request) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name is None:
                continue
            if part.name == "file":
                fields["file"] = bytes(await part.read())
                fields["filename"] = part.filename
            else:
                fields[part.name] = await part.text()
    except (ValueError, AssertionError, KeyError) as exc:
        raise ApiError(400, f"Invalid multipart request: {exc}", code="invalid_request") from None
    return fields


async def upload(request: web.Request) -> web.Response:
    ctx = context(request)
    who = principal(request)
    limits = UploadLimits(
        max_file_size=ctx.config.api.max_file_size,
        max_requests_per_file=ctx.config.api.max_requests_per_file,
        max_request_body_size=ctx.config.api.max_request_body_size,
        allowed_url_paths=tuple(ctx.config.api.allowed_url_paths),
    )
    if (request.content_length or 0) > limits.max_file_size + 10 * 1024:
        raise ApiError(
            413,
            f"File exceeds the maximum allowed size of {limits.max_file_size} bytes",
            code="file_too_large",
        )
    fields = await _read_multipart(request)
    now = datetime.now(UTC)
    purpose = validate_purpose(fields.get("purpose"))
    expires_at = validate_expires_after(
        fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]"), now
    )
    if "file" not in fields:
        raise ApiError(400, "No file field found in multipart upload", code="invalid_request")
    raw: bytes = fields["file"]
    parsed = parse_upload(raw, limits, lambda model: _model_kind(ctx.config, model, who.user))
    file_id = str(uuid.uuid4())
    commands: list[AnyCommand] = [*_parts(file_id, parsed, now)]
    commands.append(
        CreateFile(
            command_id=ids.new_id(),
            issued_at=now,
            file_id=file_id,
            owner=who.user,
            filename=fields.get("filename") or f"upload-{file_id}",
            purpose=purpose,
            bytes=len(raw),
            line_count=len(parsed.lines),
            expires_at=expires_at,
            api_key_id=who.key_id,
        )
    )
    await ctx.publisher.publish(commands)
    await ctx.wait_for(lambda: queries.file_exists(ctx.pool, file_id), "the file")
    row = await queries.get_file(ctx.pool, file_id, who.user)
    if row is None:
        raise not_found("File", file_id)
    return json_response(file_json(row), 201)


def _model_kind(config: Config, model: str, user: str) -> ModelKind | None:
    found = config.model(model)
    if found is None or (found.users and user not in found.users):
        return None
    return found.kind


def _parts(file_id: str, parsed: ParsedUpload, now: datetime) -> list[AppendFileLines]:
    parts: list[AppendFileLines] = []
    lines: list[FileLine] = []
    first = size = 0
    for line in parsed.lines:
        if lines and size + len(line.body) > PART_BYTES:
            parts.append(
                AppendFileLines(
                    command_id=ids.new_id(),
                    issued_at=now,
                    file_id=file_id,
                    first_line=first,
                    lines=lines,
                )
            )
            first, lines, size = line.line_number, [], 0
        lines.append(FileLine(line.custom_id, line.method, line.url, line.model, line.body))
        size += len(line.body)
    if lines:
        parts.append(
            AppendFileLines(
                command_id=ids.new_id(),
                issued_at=now,
                file_id=file_id,
                first_line=first,
                lines=lines,
            )
        )
    return parts


async def list_files(request: web.Request) -> web.Response:
    ctx, who, q = context(request), principal(request), request.query
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "Order must be 'asc' or 'desc'", code="invalid_request")
    limit = _limit(q.get("limit"), default=20)
    after = _optional_uuid(q.get("after"))
    rows = await queries.list_files(
        ctx.pool,
        who.user,
        after=after,
        limit=limit + 1,
        ascending=order == "asc",
        purpose=q.get("purpose"),
    )
    return json_response(list_page([file_json(r) for r in rows], limit))


def _limit(raw: str | None, default: int) -> int:
    if raw is None:
        return default
    try:
        return max(1, min(int(raw), 100))
    except ValueError:
        raise ApiError(
            400, "limit must be an integer", code="invalid_request", param="limit"
        ) from None


def _optional_uuid(raw: str | None) -> str | None:
    """A cursor that is not a UUID is ignored, as the reference does."""
    if raw is None:
        return None
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        return None


def list_page(items: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    page: dict[str, Any] = {"object": "list", "data": items[:limit], "has_more": len(items) > limit}
    if page["data"]:
        page["first_id"] = page["data"][0]["id"]
        page["last_id"] = page["data"][-1]["id"]
    return page


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
    await ctx.publisher.publish(
        [DeleteFile(command_id=ids.new_id(), issued_at=datetime.now(UTC), file_id=row["id"])]
    )
    await ctx.wait_for(lambda: queries.file_deleted(ctx.pool, row["id"]), "the deletion")
    return json_response({"id": row["id"], "object": "file", "deleted": True})


async def content(request: web.Request) -> web.StreamResponse:
    """JSONL lines; with ``limit`` one page, whose headers say whether more lines exist."""
    ctx, q = context(request), request.query
    row = await _owned_file(request)
    skip = _non_negative(q.get("skip"), "skip")
    limit = None if q.get("limit") is None else _non_negative(q.get("limit"), "limit")
    search = q.get("search") or None
    headers = {"Content-Type": "application/x-ndjson"}
    state = "completed" if row["purpose"] == "batch_output" else "failed"
    incomplete = False
    if row["purpose"] in ("batch_output", "batch_error"):
        batch = await queries.batch_by_result_file(ctx.pool, row["id"])
        incomplete = batch is not None and (batch["pending"] + batch["in_progress"]) > 0
        # A result's body travels on its own topic and may trail its row by a poll.
        await ctx.wait_for(lambda: _no_missing(ctx, row["batch_id"], state), "result bodies")
    async with ctx.pool.acquire() as conn, conn.transaction():
        fetch = None if limit is None else limit + 1
        if row["purpose"] == "batch":
            source = queries.input_lines(conn, row["id"], skip=skip, limit=fetch, search=search)
            lines = (
                input_line(r["custom_id"], r["method"], r["path"], r["body"]) async for r in source
            )
        else:
            source = queries.result_lines(
                conn, row["batch_id"], state, skip=skip, limit=fetch, search=search
            )
            lines = (_result_line(state, r) async for r in source)
        if limit is not None:
            page = [line async for line in lines]
            more = len(page) > limit
            page = page[:limit]
            headers["X-Incomplete"] = str(incomplete or more).lower()
            headers["X-Last-Line"] = str(skip + len(page))
            return web.Response(body=b"".join(page), headers=headers)
        headers["X-Incomplete"] = str(incomplete).lower()
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        async for line in lines:
            await response.write(line)
        await response.write_eof()
        return response


def _result_line(state: str, r: Any) -> bytes:
    if state == "completed":
        return output_line(r["id"], r["custom_id"], r["response_status"], r["body"])
    return error_line(r["id"], r["custom_id"], r["body"])


async def _no_missing(ctx: Any, batch_id: str, state: str) -> bool:
    return await queries.results_missing_bodies(ctx.pool, batch_id, state) == 0


def _non_negative(raw: str | None, name: str) -> int:
    if raw is None:
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ApiError(
            400, f"{name} must be a non-negative integer", code="invalid_request", param=name
        )
    return value
