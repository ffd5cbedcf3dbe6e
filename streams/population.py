"""Commands to events: the pure rules of the commands agent (files, batches, population).

Each function takes the aggregate's current record and one command and returns the new record
and what to publish, so redelivery and ordering are decided here and tested without a broker.
A command that breaks a rule raises :class:`schemas.errors.ApiError`; the agent dead-letters
it (file commands) or records a ``BatchRejected`` verdict (batch creation).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from itertools import groupby
from typing import Any, Literal

import msgspec

from schemas import bodies, ids, topics
from schemas.bodies import BodyRef
from schemas.commands import (
    AbandonUpload,
    AppendFileLines,
    CancelBatch,
    CancelRequest,
    CreateBatch,
    CreateFile,
    DeleteBatch,
    DeleteRequest,
    ModelRun,
    PopulateBatch,
    RetryBatch,
    RetryRequest,
    SubmitRequest,
)
from schemas.errors import ApiError, input_file_deleted, invalid_request, not_found
from schemas.events import (
    BatchCancelRequested,
    BatchCreated,
    BatchDeleted,
    BatchFacts,
    BatchlessFacts,
    BatchPopulated,
    BatchRejected,
    BatchRetried,
    CancelBatchRequests,
    ChunkRef,
    FileDeleted,
    FileUploaded,
    LineRange,
    PendingRequests,
    RequestControl,
    RequestSubmitted,
    RetryRows,
    SourceMark,
    TemplateMeta,
    TemplatesAppended,
    UploadAbandoned,
)
from streams import validation
from streams.emit import Out
from streams.execution.client import batch_header_values

_WINDOW = re.compile(r"^(\d+)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Manifest(msgspec.Struct):
    """What population needs of a file's lines: where their bodies are, which model each runs
    on, and the first line of each url (for the endpoint check)."""

    chunks: list[ChunkRef] = []
    body_keys: list[str] = []
    models: list[ModelRun] = []
    urls: dict[str, int] = {}
    lines: int = 0


class FileRecord(msgspec.Struct):
    """The commands agent's view of a file (table ``files``, keyed by file id)."""

    uploads: dict[str, Manifest] = {}  # uploads in progress, by upload id
    owner: str | None = None  # set once the file is created
    purpose: str = "batch"
    manifest: Manifest | None = None
    deleted: bool = False
    batches: list[str] = []  # batches created from the file (cancelled if it is deleted)


class BatchRecord(msgspec.Struct):
    """The commands agent's view of a batch (table ``batches``, keyed by batch id): what a
    retry needs to run rows again after the gate has forgotten them."""

    populated: bool = False
    cancelled: bool = False
    deleted: bool = False
    models: list[str] = []
    facts: BatchFacts | None = None
    chunks: list[ChunkRef] = []
    retry_version: int = 0
    input_deleted: bool = False  # its file was deleted: nothing of it runs again
    # The commands offset of the last command applied: a batch's commands share one commands
    # partition (its id is their key), so a command read again after a crash is at or below.
    applied: int = -1


class BatchRules(msgspec.Struct, frozen=True):
    allowed_windows: tuple[str, ...]
    allowed_paths: tuple[str, ...]
    header_fields: tuple[str, ...]


def parse_window(text: str) -> timedelta:
    """Duration text with units s/m/h/d (``24h``, ``1h``); anything else is rejected."""
    match = _WINDOW.match(text.strip())
    if match is None:
        raise invalid_request(f"invalid completion window '{text}'", param="completion_window")
    return timedelta(seconds=int(match.group(1)) * _UNIT[match.group(2)])


def service_tier(window: str) -> str | None:
    """Population derives the tier from the window: 1h is flex, 0s is priority."""
    seconds = parse_window(window).total_seconds()
    return {3600: "flex", 0: "priority"}.get(int(seconds))


# -- files ---------------------------------------------------------------------------------


def append_lines(record: FileRecord, cmd: AppendFileLines, now: datetime) -> list[Out]:
    """Lines of an upload in progress, in order; their metadata goes to ``files.v1``."""
    if record.owner is not None or record.deleted:
        raise invalid_request(f"File {cmd.file_id} already exists")
    upload = record.uploads.setdefault(cmd.upload_id, Manifest())
    count = len(cmd.lines)
    chunk = ChunkRef(cmd.first_line, count, cmd.body.partition, cmd.body.offset)
    if cmd.first_line < upload.lines and chunk in upload.chunks:
        # Appended before: the agent saved the record but its event may not have landed
        # (lines are not awaited one by one), or the command came twice. The event again.
        return [_templates_appended(cmd, now)]
    if cmd.first_line != upload.lines:
        raise invalid_request(
            f"Lines of upload {cmd.upload_id} must arrive in order: expected line "
            f"{upload.lines}, got {cmd.first_line}"
        )
    upload.chunks.append(chunk)
    upload.body_keys.append(cmd.body_key)
    for offset, line in enumerate(cmd.lines):
        upload.urls.setdefault(line.path, cmd.first_line + offset)
    # Per run of one model rather than per line: a part has thousands of lines.
    runs, number = upload.models, cmd.first_line
    for model, same in groupby(line.model for line in cmd.lines):
        end = number + sum(1 for _ in same)
        if runs and runs[-1].model == model and runs[-1].end == number:
            runs[-1] = ModelRun(model, runs[-1].start, end)
        else:
            runs.append(ModelRun(model, number, end))
        number = end
    upload.lines += count
    return [_templates_appended(cmd, now)]


def _templates_appended(cmd: AppendFileLines, now: datetime) -> Out:
    metas = [TemplateMeta(x.custom_id, x.method, x.path, x.model, x.body_size) for x in cmd.lines]
    event = TemplatesAppended(
        event_id=ids.event_id("templates", cmd.file_id, cmd.upload_id, cmd.first_line),
        occurred_at=now,
        file_id=cmd.file_id,
        first_line=cmd.first_line,
        body_key=cmd.body_key,
        body=cmd.body,
        templates=metas,
    )
    return Out("files", cmd.file_id, event)


def create_file(record: FileRecord, cmd: CreateFile, now: datetime) -> list[Out]:
    if record.owner is not None or record.deleted:
        return []  # a retried upload of a file that exists: nothing more to do
    upload = record.uploads.get(cmd.upload_id)
    if upload is None or upload.lines != cmd.line_count:
        got = 0 if upload is None else upload.lines
        raise invalid_request(
            f"File {cmd.file_id} declares {cmd.line_count} lines but upload {cmd.upload_id} "
            f"appended {got}"
        )
    record.owner, record.purpose, record.manifest = cmd.owner, cmd.purpose, upload
    record.uploads = {}
    event = FileUploaded(
        event_id=ids.event_id("file-uploaded", cmd.file_id),
        occurred_at=now,
        file_id=cmd.file_id,
        owner=cmd.owner,
        filename=cmd.filename,
        purpose=cmd.purpose,
        bytes=cmd.bytes,
        created_at=cmd.issued_at,
        expires_at=cmd.expires_at,
        template_count=cmd.line_count,
        api_key_id=cmd.api_key_id,
    )
    return [Out("files", cmd.file_id, event)]


def abandon_upload(record: FileRecord, cmd: AbandonUpload, now: datetime) -> list[Out]:
    """An upload that failed after some of its parts went out: its parts are forgotten and
    their templates voided. Nothing happens once the file exists: its lines are the file's."""
    if record.owner is not None or record.deleted:
        return []
    record.uploads.pop(cmd.upload_id, None)
    # The event even when the upload is unknown: a replay whose first run saved the record
    # before its event landed must bring the event back.
    event = UploadAbandoned(
        event_id=ids.event_id("upload-abandoned", cmd.file_id, cmd.upload_id),
        occurred_at=now,
        file_id=cmd.file_id,
        upload_id=cmd.upload_id,
    )
    return [Out("files", cmd.file_id, event)]


def forgettable(record: FileRecord) -> bool:
    """A record that holds nothing (no file, no upload in progress) need not be kept."""
    return record.owner is None and not record.deleted and not record.uploads


def delete_file(record: FileRecord, file_id: str, now: datetime) -> list[Out]:
    """The file goes; batches running from it are cancelled (core §2.2 delete_file: a batch
    that already ended is left as it is by the projector and has no rows left to cancel)."""
    if record.deleted:
        return []
    record.deleted = True
    cancels = [
        Out(
            "commands",
            batch_id,
            CancelBatch(
                command_id=ids.derived("cancel", file_id, batch_id),
                issued_at=now,
                batch_id=batch_id,
                input_deleted=True,
            ),
        )
        for batch_id in record.batches
    ]
    deleted = FileDeleted(
        event_id=ids.event_id("file-deleted", file_id), occurred_at=now, file_id=file_id
    )
    return [*cancels, Out("files", file_id, deleted)]


# -- batches -------------------------------------------------------------------------------


def check_create_batch(record: FileRecord | None, cmd: CreateBatch, rules: BatchRules) -> Manifest:
    """The API's batch creation checks, in its order, against the file as the agent knows it."""
    validation.check_window(cmd.completion_window, rules.allowed_windows)
    validation.check_endpoint(cmd.endpoint, rules.allowed_paths)
    validation.check_metadata(cmd.metadata)
    if record is None or record.deleted or record.owner != cmd.owner or record.manifest is None:
        raise not_found("File", cmd.input_file_id)
    if record.purpose != "batch":
        raise ApiError(
            400,
            f"File with ID {cmd.input_file_id} does not have purpose 'batch'",
            code="invalid_file",
        )
    validation.check_lines_match_endpoint(record.manifest.urls, cmd.endpoint)
    return record.manifest


def create_batch(
    record: FileRecord | None, cmd: CreateBatch, rules: BatchRules, now: datetime
) -> list[Out]:
    """BatchCreated and the PopulateBatch that follows it, or a BatchRejected verdict."""
    try:
        manifest = check_create_batch(record, cmd, rules)
    except ApiError as exc:
        rejected = BatchRejected(
            event_id=ids.event_id("batch-rejected", cmd.batch_id),
            occurred_at=now,
            batch_id=cmd.batch_id,
            owner=cmd.owner,
            status=exc.status,
            message=exc.message,
            code=None if exc.code is None else str(exc.code),
            param=exc.param,
        )
        return [Out("batches", cmd.batch_id, rejected)]
    assert record is not None
    if cmd.batch_id not in record.batches:
        record.batches.append(cmd.batch_id)
    created_at = cmd.issued_at
    expires_at = created_at + parse_window(cmd.completion_window)
    created = BatchCreated(
        event_id=ids.event_id("batch-created", cmd.batch_id),
        occurred_at=now,
        batch_id=cmd.batch_id,
        owner=cmd.owner,
        input_file_id=cmd.input_file_id,
        endpoint=cmd.endpoint,
        completion_window=cmd.completion_window,
        metadata=cmd.metadata,
        created_at=created_at,
        expires_at=expires_at,
        output_file_id=ids.output_file_id(cmd.batch_id),
        error_file_id=ids.error_file_id(cmd.batch_id),
        api_key_id=cmd.api_key_id,
    )
    populate = PopulateBatch(
        command_id=ids.derived("populate", cmd.batch_id),
        issued_at=now,
        batch_id=cmd.batch_id,
        input_file_id=cmd.input_file_id,
        owner=cmd.owner,
        endpoint=cmd.endpoint,
        completion_window=cmd.completion_window,
        created_at=created_at,
        expires_at=expires_at,
        headers=_headers(created, manifest.lines, rules.header_fields),
        chunks=manifest.chunks,
        models=manifest.models,
    )
    return [Out("batches", cmd.batch_id, created), Out("commands", cmd.batch_id, populate)]


def _headers(created: BatchCreated, total: int, fields: tuple[str, ...]) -> dict[str, str]:
    """The x-fusillade-batch-* header values (core §4.4) of a batch, fixed at population."""
    known: Mapping[str, Any] = {
        "id": created.batch_id,
        "file_id": created.input_file_id,
        "endpoint": created.endpoint,
        "completion_window": created.completion_window,
        "metadata": created.metadata,
        "output_file_id": created.output_file_id,
        "error_file_id": created.error_file_id,
        "created_by": created.owner,
        "created_at": created.created_at,
        "expires_at": created.expires_at,
        "total_requests": total,
    }
    return batch_header_values(fields, known, created.metadata or {})


def populate(
    record: BatchRecord, cmd: PopulateBatch, source: tuple[int, int], now: datetime
) -> list[Out]:
    """One pending row per line, per model a PendingRequests for the gate, then
    BatchPopulated. A batch cancelled first is not populated (core §5.2.1)."""
    if record.cancelled:
        return [_cancel_requested(cmd.batch_id, now)]
    if record.populated:
        return []  # redelivered: population happens exactly once
    window_s = max((cmd.expires_at - cmd.created_at).total_seconds(), 0.0)
    by_model: dict[str, list[LineRange]] = {}
    for run in cmd.models:
        by_model.setdefault(run.model, []).append(LineRange(run.start, run.end))
    out: list[Out] = []
    facts = BatchFacts(
        batch_id=cmd.batch_id,
        file_id=cmd.input_file_id,
        owner=cmd.owner,
        created_at=cmd.created_at,
        deadline=cmd.expires_at,
        window_class=cmd.completion_window,
        window_s=window_s,
        path=cmd.endpoint,
        service_tier=service_tier(cmd.completion_window),
        headers=cmd.headers,
    )
    for seq, (model, ranges) in enumerate(sorted(by_model.items())):
        pending = PendingRequests(
            event_id=ids.event_id("pending", cmd.batch_id, model),
            occurred_at=now,
            source=SourceMark(source[0], source[1], seq),
            batch=facts,
            model=model,
            ranges=ranges,
            chunks=cmd.chunks,
        )
        out.append(Out("gate", model, pending))
    total = sum(r.end - r.start for ranges in by_model.values() for r in ranges)
    counts = {m: sum(r.end - r.start for r in ranges) for m, ranges in by_model.items()}
    out.append(
        Out(
            "batches",
            cmd.batch_id,
            BatchPopulated(
                event_id=ids.event_id("populated", cmd.batch_id),
                occurred_at=now,
                batch_id=cmd.batch_id,
                total=total,
                models=counts,
            ),
        )
    )
    record.populated, record.models = True, sorted(by_model)
    record.facts, record.chunks = facts, cmd.chunks
    return out


def retry(
    record: BatchRecord, cmd: RetryBatch, source: tuple[int, int], now: datetime
) -> list[Out]:
    """Run rows again (core §2.3/§2.4 retry): the batch un-terminalises under a new retry
    version, and an expired batch gets a new deadline (README decisions)."""
    if record.deleted or record.facts is None:
        raise not_found("Batch", cmd.batch_id)
    if record.input_deleted:
        raise input_file_deleted(cmd.batch_id)
    if cmd.retry_version != record.retry_version:
        raise ApiError(
            409,
            f"Batch {cmd.batch_id} changed since it was read (retry version "
            f"{record.retry_version}, not {cmd.retry_version}); read it again",
            code="invalid_state",
        )
    version = record.retry_version + 1
    facts = record.facts
    window = timedelta(seconds=facts.window_s)
    deadline = facts.deadline if facts.deadline > now else now + window
    facts = msgspec.structs.replace(facts, retry_version=version, deadline=deadline)
    _check_rows(record, cmd)
    failed = {r.model: r.ranges for r in cmd.failed}
    canceled = {r.model: r.ranges for r in cmd.canceled}
    rows = sum(r.end - r.start for ranges in (*failed.values(), *canceled.values()) for r in ranges)
    out = [
        Out(
            "batches",
            cmd.batch_id,
            BatchRetried(
                event_id=ids.event_id("batch-retried", cmd.batch_id, version),
                occurred_at=now,
                batch_id=cmd.batch_id,
                retry_version=version,
                scope=cmd.scope,
                rows=rows,
                expires_at=deadline,
            ),
        )
    ]
    for seq, model in enumerate(sorted(set(record.models) | set(failed) | set(canceled))):
        out.append(
            Out(
                "gate",
                model,
                RetryRows(
                    event_id=ids.event_id("retry-rows", cmd.batch_id, version, model),
                    occurred_at=now,
                    source=SourceMark(source[0], source[1], seq),
                    batch=facts,
                    model=model,
                    failed=failed.get(model, []),
                    canceled=canceled.get(model, []),
                    chunks=record.chunks,
                    scope=cmd.scope,
                ),
            )
        )
    record.retry_version, record.facts, record.cancelled = version, facts, False
    return out


def _check_rows(record: BatchRecord, cmd: RetryBatch) -> None:
    """The rows a retry names are lines of the batch on models it runs: a command from
    outside that named others would have the gate build every one of them."""
    lines = sum(c.count for c in record.chunks)
    for rows in (*cmd.failed, *cmd.canceled):
        if rows.model not in record.models:
            raise invalid_request(f"Batch {cmd.batch_id} has no rows on model '{rows.model}'")
        for r in rows.ranges:
            if not 0 <= r.start < r.end <= lines:
                raise invalid_request(
                    f"Rows {r.start}–{r.end} are not lines of batch {cmd.batch_id} ({lines} lines)"
                )


def batch_command(
    record: BatchRecord,
    cmd: PopulateBatch | CancelBatch | RetryBatch | DeleteBatch,
    source: tuple[int, int],
    now: datetime,
) -> list[Out]:
    """Apply a batch command once. One the agent applied and saved before a crash, but whose
    offset it had not committed, is read again; applied again after the commands that
    followed it, a cancel would stop a batch they resumed (and the resume be refused)."""
    if source[1] <= record.applied:
        return []
    match cmd:
        case PopulateBatch():
            outs = populate(record, cmd, source, now)
        case RetryBatch():
            outs = retry(record, cmd, source, now)
        case DeleteBatch():
            outs = delete_batch(record, cmd, source, now)
        case CancelBatch():
            outs = cancel_requested(record, cmd.batch_id, source, now, input_deleted=cmd.input_deleted)  # fmt: skip
    record.applied = source[1]
    return outs


def delete_batch(
    record: BatchRecord, cmd: DeleteBatch, source: tuple[int, int], now: datetime
) -> list[Out]:
    """Soft delete, and a cancel of whatever still runs (core §2.3 delete_batch). An erasure
    of a batch deleted before clears what the deletion kept (its metadata)."""
    if record.deleted:
        if not cmd.erase:
            return []
        erased = BatchDeleted(
            event_id=ids.event_id("batch-erased", cmd.batch_id),
            occurred_at=now,
            batch_id=cmd.batch_id,
            erase=True,
        )
        return [Out("batches", cmd.batch_id, erased)]
    record.deleted = True
    deleted = BatchDeleted(
        event_id=ids.event_id("batch-deleted", cmd.batch_id),
        occurred_at=now,
        batch_id=cmd.batch_id,
        erase=cmd.erase,
    )
    cancel = cancel_requested(record, cmd.batch_id, source, now)
    return [*cancel, Out("batches", cmd.batch_id, deleted)]


# -- requests without a batch -----------------------------------------------------------------


class RequestRecord(msgspec.Struct):
    """The commands agent's view of a batchless request (table ``requests``): enough to route
    its owner's controls to the gate partition of its model, and to run it again."""

    model: str
    owner: str
    facts: BatchlessFacts | None = None
    body: BodyRef | None = None
    erased: bool = False


class RequestRules(msgspec.Struct, frozen=True):
    kinds: dict[str, str]  # model -> chat | embeddings, for the models a user may use
    users: dict[str, tuple[str, ...]]  # model -> allowed users (empty: everyone)
    flex_window_s: float


FLEX_PATHS = ("/v1/chat/completions", "/v1/responses")


def submit(
    record: RequestRecord | None,
    cmd: SubmitRequest,
    source: tuple[int, int],
    rules: RequestRules,
    now: datetime,
) -> tuple[RequestRecord, list[Out]]:
    """A flex request for the claim gate, after the API's model rules (§8.1, §7.5)."""
    if record is not None:
        return record, []  # submitted already
    allowed = rules.users.get(cmd.model)
    if cmd.model not in rules.kinds or (allowed and cmd.owner not in allowed):
        raise ApiError(
            403,
            f"You do not have access to '{cmd.model}'. Please contact your administrator to "
            "request access.",
            code="model_not_accessible",
        )
    if cmd.path not in FLEX_PATHS or rules.kinds[cmd.model] != "chat":
        raise invalid_request(f"Flex requests go to {' or '.join(FLEX_PATHS)} on a chat model")
    facts = BatchlessFacts(
        owner=cmd.owner,
        path=cmd.path,
        service_tier="flex",
        created_at=cmd.created_at,
        deadline=cmd.created_at + timedelta(seconds=rules.flex_window_s),
        background=cmd.background,
        api_key_id=cmd.api_key_id,
    )
    submitted = RequestSubmitted(
        event_id=ids.event_id("submitted", cmd.request_id),
        occurred_at=now,
        source=SourceMark(source[0], source[1], 0),
        request_id=cmd.request_id,
        model=cmd.model,
        facts=facts,
        body=cmd.body,
    )
    record = RequestRecord(cmd.model, cmd.owner, facts, cmd.body)
    return record, [Out("gate", cmd.model, submitted)]


def control(
    record: RequestRecord | None,
    cmd: CancelRequest | RetryRequest | DeleteRequest,
    source: tuple[int, int],
    now: datetime,
) -> list[Out]:
    """A batchless request's owner cancels, retries or erases it (core §2.4). Erasure also
    tombstones its bodies, so its content leaves the bodies topic at the next compaction."""
    if record is None or record.erased:
        raise not_found("Request", cmd.request_id)
    action: Literal["cancel", "retry", "erase"] = (
        "cancel" if isinstance(cmd, CancelRequest)
        else "retry" if isinstance(cmd, RetryRequest) else "erase"
    )  # fmt: skip
    event = RequestControl(
        event_id=ids.event_id("request-control", cmd.request_id, action, source[1]),
        occurred_at=now,
        source=SourceMark(source[0], source[1], 0),
        request_id=cmd.request_id,
        model=record.model,
        action=action,
        facts=record.facts if action == "retry" else None,
        body=record.body if action == "retry" else None,
    )
    out = [Out("gate", record.model, event)]
    if action == "erase":
        record.erased = True
        partition = bodies.partition_for(cmd.request_id, topics.BODIES.partitions)
        out += [
            Out("bodies", bodies.key(kind, cmd.request_id), None, partition=partition)
            for kind in (bodies.TEMPLATE, bodies.RESULT, bodies.ERROR)
        ]
    return out


def cancel_requested(
    record: BatchRecord,
    batch_id: str,
    source: tuple[int, int],
    now: datetime,
    *,
    input_deleted: bool = False,
) -> list[Out]:
    """A cancel reaches the batch and each gate partition holding its rows."""
    record.cancelled = True
    record.input_deleted = record.input_deleted or input_deleted
    return [_cancel_requested(batch_id, now)] + [
        Out(
            "gate",
            model,
            CancelBatchRequests(
                event_id=ids.event_id("cancel", batch_id, model),
                occurred_at=now,
                batch_id=batch_id,
                model=model,
                source=SourceMark(source[0], source[1], seq),
            ),
        )
        for seq, model in enumerate(record.models)
    ]


def _cancel_requested(batch_id: str, now: datetime) -> Out:
    return Out(
        "batches",
        batch_id,
        BatchCancelRequested(
            event_id=ids.event_id("cancel", batch_id), occurred_at=now, batch_id=batch_id
        ),
    )
