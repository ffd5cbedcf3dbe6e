"""The commands agent: turns commands into events, one aggregate at a time.

Commands are keyed by aggregate id, so a batch's create and cancel (or a file's parts and its
header) are handled in order by one worker. A small table remembers each batch's progress, so
a redelivered CreateBatch does not populate twice and a cancel that overtook its create still
wins.
"""

from __future__ import annotations

import logging
from datetime import datetime

import msgspec
from faust.types import StreamT

from schemas import codec, ids
from schemas.commands import (
    AnyCommand,
    AppendFileLines,
    CancelBatch,
    CreateBatch,
    CreateFile,
    DeleteFile,
    aggregate_id,
)
from schemas.events import BatchCancelRequested, CancelBatchRequests, FileDeleted
from streams import population
from streams.app import Streams, decode_or_none, utcnow
from streams.emit import Out
from streams.store import Store

log = logging.getLogger(__name__)

_MISSING_FILE = {
    "missing": "File with ID {} not found",
    "deleted": "source file was deleted before batch population",
    "wrong_purpose": "File with ID {} does not have purpose 'batch'",
}


class BatchProgress(msgspec.Struct):
    populated: bool = False
    cancelled: bool = False
    models: list[str] = []


_progress_decoder = msgspec.msgpack.Decoder(BatchProgress)


def register(streams: Streams, store: Store) -> None:
    app = streams.app
    progress = app.Table("batch-progress", default=None, key_type=bytes, value_type=bytes)

    def get(batch_id: str) -> BatchProgress:
        raw = progress.get(batch_id.encode())
        return BatchProgress() if raw is None else _progress_decoder.decode(raw)

    def put(batch_id: str, state: BatchProgress) -> None:
        progress[batch_id.encode()] = msgspec.msgpack.encode(state)

    async def handle(cmd: AnyCommand) -> list[Out]:
        now = utcnow()
        match cmd:
            case AppendFileLines():
                return population.append_lines(cmd, now)
            case CreateFile():
                return population.create_file(cmd, now)
            case DeleteFile():
                cancels: list[Out] = [
                    Out(
                        "commands",
                        b,
                        CancelBatch(
                            command_id=ids.derived("cancel", cmd.command_id, b),
                            issued_at=now,
                            batch_id=b,
                        ),
                    )
                    for b in await store.live_batches_using(cmd.file_id)
                ]
                deleted = FileDeleted(
                    event_id=ids.event_id("file-deleted", cmd.file_id),
                    occurred_at=now,
                    file_id=cmd.file_id,
                )
                return [*cancels, Out("files", cmd.file_id, deleted)]
            case CreateBatch():
                return await create_batch(cmd, now)
            case CancelBatch():
                return cancel_batch(cmd.batch_id, now)
        return []

    async def create_batch(cmd: CreateBatch, now: datetime) -> list[Out]:
        state = get(cmd.batch_id)
        if state.populated:
            return []  # redelivered: population happens exactly once
        created = population.create_batch(cmd)
        await streams.publish([Out("batches", cmd.batch_id, created)])
        if state.cancelled:
            return cancel_batch(cmd.batch_id, created.occurred_at)
        file_state, manifest = await store.file_manifest(cmd.input_file_id, cmd.owner)
        if file_state != "ok":
            outs = [
                population.population_failed(
                    cmd.batch_id, _MISSING_FILE[file_state].format(cmd.input_file_id), utcnow()
                )
            ]
        else:
            outs = population.populate(created, manifest, utcnow())
        put(cmd.batch_id, BatchProgress(populated=True, models=sorted({r.model for r in manifest})))
        return outs

    def cancel_batch(batch_id: str, now: datetime) -> list[Out]:
        state = get(batch_id)
        state.cancelled = True
        put(batch_id, state)
        outs = [
            Out(
                "batches",
                batch_id,
                BatchCancelRequested(
                    event_id=ids.event_id("cancel", batch_id), occurred_at=now, batch_id=batch_id
                ),
            )
        ]
        outs += [
            Out(
                "gate",
                model,
                CancelBatchRequests(
                    event_id=ids.event_id("cancel", batch_id, model),
                    occurred_at=now,
                    batch_id=batch_id,
                    model=model,
                ),
            )
            for model in state.models
        ]
        return outs

    @app.agent(streams.topics["commands"], name="commands")
    async def commands(stream: StreamT) -> None:
        async for event in stream.events():
            cmd, reason = decode_or_none(codec.commands, event.value)
            if cmd is None:
                await streams.dead_letter(event, reason or "undecodable")
                continue
            try:
                outs = await handle(cmd)
            except ValueError as exc:  # e.g. an unparseable completion window
                await streams.dead_letter(event, str(exc))
                continue
            await streams.publish(outs)
            log.info("%s %s: %d events", type(cmd).__name__, aggregate_id(cmd), len(outs))
