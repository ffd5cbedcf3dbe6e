"""The commands agent: turns commands into events, one aggregate at a time.

Commands are keyed by aggregate id, so a file's parts, its header, its deletion and the batches
created from it are handled in order by one worker, and a batch's population and cancel too.
Two small tables hold each aggregate's record (``files``, ``batches``); the agent never reads
the read model, so no command waits on a projection and none can stall the stream.

Every record change is written after the events it caused were acknowledged: a crash in
between replays the command, which the pure rules (:mod:`streams.population`) and the gate's
population marks make harmless, and never loses an event. A file's lines are the exception, as
they come by the dozen and waiting on each would serialize an upload on broker round trips:
their events and record change go out together, Faust flushes both before it commits the
command, and a replayed append whose record landed without its event gets the event again.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from faust.types import EventT, StreamT

from cannonade import logs
from schemas import codec, topics
from schemas.commands import (
    AbandonUpload,
    AnyCommand,
    AppendFileLines,
    CancelBatch,
    CancelRequest,
    CreateBatch,
    CreateFile,
    DeleteBatch,
    DeleteFile,
    DeleteRequest,
    PopulateBatch,
    RetryBatch,
    RetryRequest,
    SubmitRequest,
    aggregate_id,
)
from schemas.errors import ApiError
from streams import population
from streams.app import BROKER_AWAY, Streams, decode_or_none, utcnow
from streams.emit import Out
from streams.population import BatchRecord, BatchRules, FileRecord, RequestRecord, RequestRules
from streams.tables import Utf8Keys

log = logging.getLogger(__name__)

_files_decoder = msgspec.msgpack.Decoder(FileRecord)
_batches_decoder = msgspec.msgpack.Decoder(BatchRecord)
_requests_decoder = msgspec.msgpack.Decoder(RequestRecord)


def register(streams: Streams) -> None:
    app = streams.app
    config = streams.config
    kwargs: dict[str, Any] = {"default": None, "key_type": bytes, "value_type": bytes}
    files = Utf8Keys(app.Table(topics.COMMANDS_FILES_TABLE, **kwargs))
    batches = Utf8Keys(app.Table(topics.COMMANDS_BATCHES_TABLE, **kwargs))
    requests = Utf8Keys(app.Table(topics.COMMANDS_REQUESTS_TABLE, **kwargs))
    request_rules = RequestRules(
        kinds={name: m.kind for name, m in config.models.items()},
        users={name: tuple(m.users) for name, m in config.models.items()},
        flex_window_s=config.gate.window_for_tier("flex"),
    )
    rules = BatchRules(
        allowed_windows=tuple(config.api.allowed_completion_windows),
        allowed_paths=tuple(config.api.allowed_url_paths),
        header_fields=tuple(config.executor.batch_metadata_fields),
    )

    def file(file_id: str) -> FileRecord:
        raw = files.get(file_id)
        return FileRecord() if raw is None else _files_decoder.decode(raw)

    def batch(batch_id: str) -> BatchRecord:
        raw = batches.get(batch_id)
        return BatchRecord() if raw is None else _batches_decoder.decode(raw)

    async def handle(cmd: AnyCommand, event: EventT[Any]) -> list[Out]:
        now = utcnow()
        outs: list[Out]
        match cmd:
            case AppendFileLines() | CreateFile() | AbandonUpload() | DeleteFile() | CreateBatch():
                record = file(aggregate_id(cmd))
                if isinstance(cmd, AppendFileLines):
                    outs = population.append_lines(record, cmd, now)
                elif isinstance(cmd, CreateFile):
                    outs = population.create_file(record, cmd, now)
                elif isinstance(cmd, AbandonUpload):
                    outs = population.abandon_upload(record, cmd, now)
                elif isinstance(cmd, DeleteFile):
                    outs = population.delete_file(record, cmd.file_id, now)
                else:
                    known = aggregate_id(cmd) in files
                    outs = population.create_batch(record if known else None, cmd, rules, now)
                    if not known:  # rejected: nothing to remember of a file never seen
                        await streams.publish(outs, wait=True)
                        return outs
                await streams.publish(outs, wait=not isinstance(cmd, AppendFileLines))
                if population.forgettable(record):  # an abandoned upload was all it held
                    files.pop(aggregate_id(cmd), None)
                else:
                    files[aggregate_id(cmd)] = msgspec.msgpack.encode(record)
            case SubmitRequest():
                raw = requests.get(cmd.request_id)
                seen = None if raw is None else _requests_decoder.decode(raw)
                source = (event.message.partition, event.message.offset)
                record_, outs = population.submit(seen, cmd, source, request_rules, now)
                await streams.publish(outs, wait=True)
                requests[cmd.request_id] = msgspec.msgpack.encode(record_)
            case CancelRequest() | RetryRequest() | DeleteRequest():
                raw = requests.get(cmd.request_id)
                seen = None if raw is None else _requests_decoder.decode(raw)
                source = (event.message.partition, event.message.offset)
                outs = population.control(seen, cmd, source, now)
                await streams.publish(outs, wait=True)
                if seen is not None:
                    requests[cmd.request_id] = msgspec.msgpack.encode(seen)
            case PopulateBatch() | CancelBatch() | RetryBatch() | DeleteBatch():
                state = batch(cmd.batch_id)
                source = (event.message.partition, event.message.offset)
                outs = population.batch_command(state, cmd, source, now)
                await streams.publish(outs, wait=True)
                batches[cmd.batch_id] = msgspec.msgpack.encode(state)
        return outs

    @app.agent(streams.bind(topics.COMMANDS), name="commands")
    async def commands(stream: StreamT[Any]) -> None:
        async for event in streams.events(stream.events()):
            cmd, reason = decode_or_none(codec.commands, event.value)
            if cmd is None:
                await streams.dead_letter(event, reason or "undecodable")
                continue
            key = event.key.decode("utf-8", "replace") if isinstance(event.key, bytes) else None
            if key != aggregate_id(cmd):
                # Keyed otherwise, it would be ordered against the wrong aggregate.
                await streams.dead_letter(
                    event, f"{type(cmd).__name__} must be keyed by '{aggregate_id(cmd)}'"
                )
                continue
            with logs.bound(**_ids(cmd)):
                try:
                    outs = await handle(cmd, event)
                except ApiError as exc:
                    await streams.dead_letter(event, exc.message, kind="refused")
                    continue
                except BROKER_AWAY:
                    raise  # the broker is away: the command is read again once it is back
                except Exception as exc:
                    # A defect one command triggers must not stop its partition for good.
                    log.exception("commands agent could not apply %s", type(cmd).__name__)
                    await streams.dead_letter(event, f"commands agent could not apply it: {exc!r}")  # fmt: skip
                    continue
                finally:
                    await streams.send_changelog(event.message.partition, files, batches, requests)
                streams.metrics.command(type(cmd).__name__)
                log.info("%s %s: %d events", type(cmd).__name__, key, len(outs))


def _ids(cmd: AnyCommand) -> dict[str, str]:
    """The ids a command names, for its log lines."""
    found = {
        "file_id": getattr(cmd, "file_id", None) or getattr(cmd, "input_file_id", None),
        "batch_id": getattr(cmd, "batch_id", None),
        "request_id": getattr(cmd, "request_id", None),
    }
    return {name: value for name, value in found.items() if isinstance(value, str)}
