"""The gate agent: one stream of everything a model partition hears, folded by :class:`Gate`.

It reads the lifecycle topic and the gate topic together. Both are keyed by model with one
partition count, so a model's pending rows, in-flight claims and executor reports all arrive
at one worker, in order, and its table changelog lands on the same partition number.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, MutableMapping
from datetime import timedelta
from typing import Any

from faust.types import StreamT

from schemas import codec, ids, topics
from schemas.events import GateTick
from streams.app import Streams, decode_or_none, utcnow
from streams.emit import Out
from streams.gate.core import Gate, Liveness

log = logging.getLogger(__name__)

TICK_INTERVAL_S = 1.0


class Utf8Keys(MutableMapping[str, bytes]):
    """A Faust table seen with ``str`` keys; the table stores raw bytes keys so that keys read
    back from the changelog on recovery compare equal to the ones written."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def __getitem__(self, key: str) -> bytes:
        value = self.table[key.encode()]
        if value is None:
            raise KeyError(key)
        return value  # type: ignore[no-any-return]

    def __setitem__(self, key: str, value: bytes) -> None:
        self.table[key.encode()] = value

    def __delitem__(self, key: str) -> None:
        del self.table[key.encode()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.table.get(key.encode()) is not None

    def __iter__(self) -> Iterator[str]:
        return (k.decode() for k in self.table.keys())

    def __len__(self) -> int:
        return len(self.table)

    def get(self, key: str, default: Any = None) -> Any:
        value = self.table.get(key.encode())
        return default if value is None else value

    def items(self) -> Any:  # type: ignore[override]
        return ((k.decode(), v) for k, v in self.table.items() if v is not None)


def register(streams: Streams) -> Gate:
    app = streams.app
    config = streams.config
    kwargs: dict[str, Any] = {
        "default": None,
        "key_type": bytes,
        "value_type": bytes,
        "partitions": topics.GATE_PARTITIONS,
    }
    tables = {
        name: Utf8Keys(app.Table(f"gate-{name}", **kwargs))
        for name in ("entries", "cancelled-batches", "model-states", "buckets")
    }
    worker_id = f"gate:{socket.gethostname()}:{os.getpid()}"
    limits = {name: model.concurrency for name, model in config.models.items()}
    live = config.liveness
    gate = Gate(
        tables["entries"],
        limits,
        worker_id,
        tables["cancelled-batches"],
        model_states=tables["model-states"],
        buckets=tables["buckets"],
        config=config.gate,
        liveness=Liveness(
            claim_timeout=timedelta(milliseconds=live.claim_timeout_ms),
            processing_timeout=timedelta(milliseconds=live.processing_timeout_ms),
            stale_worker=timedelta(milliseconds=live.stale_daemon_threshold_ms),
            max_retries=config.executor.max_retries,
        ),
    )
    rebuild = {"needed": True}

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _assigned(sender: Any, *args: Any, **kwargs: Any) -> None:
        # Tables recover before the stream resumes; derive the index on the next event.
        rebuild["needed"] = True

    source = app.topic(
        topics.REQUESTS.name,
        topics.GATE.name,
        topics.MODEL_FILTERS.name,
        key_type=bytes,
        value_type=bytes,
    )

    @app.agent(source, name="gate")
    async def gate_agent(stream: StreamT) -> None:
        async for event in stream.events():
            message, reason = decode_or_none(codec.gate_inputs, event.value)
            if message is None:
                await streams.dead_letter(event, reason or "undecodable")
                continue
            if rebuild["needed"]:
                gate.rebuild()
                rebuild["needed"] = False
            outs = gate.handle(message, utcnow())
            if outs:
                await streams.publish(outs)

    @app.timer(interval=TICK_INTERVAL_S, on_leader=True)
    async def tick() -> None:
        # Ticks travel through the gate topic so that time-driven claims run inside the
        # partition's stream, where table writes are allowed; a duplicate tick is harmless.
        now = utcnow()
        await streams.publish(
            [
                Out("gate", model, GateTick(event_id=ids.new_id(), occurred_at=now, model=model))
                for model in limits
            ]
        )

    return gate
