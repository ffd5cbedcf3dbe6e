"""Commands to events: the pure rules of the commands agent (files, batches, population)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import msgspec

from schemas import ids
from schemas.commands import AppendFileLines, CreateBatch, CreateFile
from schemas.events import (
    BatchCreated,
    BatchPopulated,
    BatchPopulationFailed,
    Body,
    FileUploaded,
    PendingItem,
    RequestsPending,
    TemplateMeta,
    TemplatesAppended,
)
from streams.emit import Out

PENDING_CHUNK = 1000
_WINDOW = re.compile(r"^(\d+)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ManifestRow(msgspec.Struct, frozen=True, array_like=True):
    """One template of a batch's input file, as population needs it."""

    template_id: str
    line_number: int
    custom_id: str | None
    model: str


def parse_window(text: str) -> timedelta:
    """Duration text with units s/m/h/d (``24h``, ``1h``); anything else is rejected."""
    match = _WINDOW.match(text.strip())
    if match is None:
        raise ValueError(f"invalid completion window '{text}'")
    return timedelta(seconds=int(match.group(1)) * _UNIT[match.group(2)])


def service_tier(window: str) -> str | None:
    """Population derives the tier from the window: 1h is flex, 0s is priority."""
    seconds = parse_window(window).total_seconds()
    return {3600: "flex", 0: "priority"}.get(int(seconds))


def append_lines(cmd: AppendFileLines, now: datetime) -> list[Out]:
    """Bodies go to their own compacted topic; the lifecycle topic gets sizes only."""
    out: list[Out] = []
    metas: list[TemplateMeta] = []
    for offset, line in enumerate(cmd.lines):
        number = cmd.first_line + offset
        tid = ids.template_id(cmd.file_id, number)
        out.append(Out("bodies", f"tpl:{tid}", Body(kind="tpl", ref=tid, text=line.body)))
        metas.append(
            TemplateMeta(
                template_id=tid,
                line_number=number,
                custom_id=line.custom_id,
                method=line.method,
                path=line.path,
                model=line.model,
                body_size=len(line.body.encode()),
            )
        )
    out.append(
        Out(
            "files",
            cmd.file_id,
            TemplatesAppended(
                event_id=ids.event_id("templates", cmd.file_id, cmd.first_line),
                occurred_at=now,
                file_id=cmd.file_id,
                templates=metas,
            ),
        )
    )
    return out


def create_file(cmd: CreateFile, now: datetime) -> list[Out]:
    return [
        Out(
            "files",
            cmd.file_id,
            FileUploaded(
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
            ),
        )
    ]


def create_batch(cmd: CreateBatch) -> BatchCreated:
    created_at = cmd.issued_at
    return BatchCreated(
        event_id=ids.event_id("batch-created", cmd.batch_id),
        occurred_at=created_at,
        batch_id=cmd.batch_id,
        owner=cmd.owner,
        input_file_id=cmd.input_file_id,
        endpoint=cmd.endpoint,
        completion_window=cmd.completion_window,
        metadata=cmd.metadata,
        created_at=created_at,
        expires_at=created_at + parse_window(cmd.completion_window),
        output_file_id=ids.output_file_id(cmd.batch_id),
        error_file_id=ids.error_file_id(cmd.batch_id),
        api_key_id=cmd.api_key_id,
    )


def population_failed(batch_id: str, message: str, now: datetime) -> Out:
    return Out(
        "batches",
        batch_id,
        BatchPopulationFailed(
            event_id=ids.event_id("population-failed", batch_id),
            occurred_at=now,
            batch_id=batch_id,
            message=message,
        ),
    )


def populate(created: BatchCreated, manifest: list[ManifestRow], now: datetime) -> list[Out]:
    """One pending row per template (ids derived from batch and line), then BatchPopulated.

    An empty manifest fails the population with the reference's message."""
    if not manifest:
        return [
            population_failed(
                created.batch_id, "Cannot populate batch from file with no templates", now
            )
        ]
    by_model: dict[str, list[PendingItem]] = {}
    for row in manifest:
        by_model.setdefault(row.model, []).append(
            PendingItem(
                ids.request_id(created.batch_id, row.line_number),
                row.template_id,
                row.line_number,
                row.custom_id,
            )
        )
    tier = service_tier(created.completion_window)
    out: list[Out] = []
    for model, items in by_model.items():
        for start in range(0, len(items), PENDING_CHUNK):
            out.append(
                Out(
                    "requests",
                    model,
                    RequestsPending(
                        event_id=ids.event_id("pending", created.batch_id, model, start),
                        occurred_at=now,
                        batch_id=created.batch_id,
                        model=model,
                        owner=created.owner,
                        created_at=now,
                        deadline=created.expires_at,
                        window_class=created.completion_window,
                        service_tier=tier,
                        items=items[start : start + PENDING_CHUNK],
                        window_s=max(
                            (created.expires_at - created.created_at).total_seconds(), 0.0
                        ),
                    ),
                )
            )
    out.append(
        Out(
            "batches",
            created.batch_id,
            BatchPopulated(
                event_id=ids.event_id("populated", created.batch_id),
                occurred_at=now,
                batch_id=created.batch_id,
                total=len(manifest),
                models={m: len(items) for m, items in by_model.items()},
            ),
        )
    )
    return out
