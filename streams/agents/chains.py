"""The step-chain agent (role ``chains``, Faust app ``cannonade-chains``): drives every
multi-step response from the events on ``cannonade.responses.v1``, folded by
:class:`~streams.chains.core.ChainCore`.

Each chain's state lives in the changelog-backed table ``chains``, keyed by response uuid and
co-partitioned with the topic, so whichever worker owns a partition can resume its chains.
A decision's bodies are acknowledged before its events, and its events before its state
reaches the changelog (write-behind): a crash in between makes the agent re-decide and
re-publish the same facts, which every consumer dedupes by id.

Claimed heads (flex requests, batch lines) stay in flight at the claim gate for the whole
chain: the worker says it holds them and sends heartbeats to every gate partition, so the gate
judges them by this worker's liveness and does not take a long chain back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from faust.types import StreamT

from cannonade import __version__
from schemas import codec, ids, topics
from schemas.bodies import BodyRef
from schemas.events import WorkerHeartbeat, WorkerStarted, WorkerStopped
from streams import metrics
from streams.app import BROKER_AWAY, Streams, decode_or_none, utcnow
from streams.chains.core import BodyRecord, ChainCore, PayloadUnavailable
from streams.emit import Out
from streams.execution.bodies import BodyGone, BodyReader
from streams.tables import Utf8Keys, WriteBehind

log = logging.getLogger(__name__)

ROLE = "chains"
# What a lost broker connection raises: retried, never dead-lettered.
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.2, 5.0


class KafkaBodies:
    """The bodies topic for a chain agent or step executor: writes are acknowledged and say
    where they landed; reads go through a :class:`BodyReader` (cached)."""

    def __init__(self, streams: Streams, reader: BodyReader) -> None:
        self.streams = streams
        self.reader = reader

    async def write_bodies(self, records: Sequence[BodyRecord]) -> list[BodyRef]:
        return await self.streams.write_bodies([(r.key, r.value, r.partition) for r in records])

    async def read_body(self, ref: BodyRef) -> bytes:
        try:
            return (await self.reader.template(ref)).body
        except BodyGone as exc:
            raise PayloadUnavailable(str(exc)) from exc

    async def publish(self, outs: Sequence[Out]) -> None:
        await self.streams.publish(outs, wait=True)


def worker_events(worker_id: str, role: str, kind: type[WorkerHeartbeat | WorkerStopped], in_flight: int = 0) -> list[Out]:  # fmt: skip
    """A daemon record, and for heartbeats a liveness signal to every gate partition."""
    beat = kind(
        event_id=ids.new_id(), occurred_at=utcnow(), worker_id=worker_id, role=role,
        requests_in_flight=in_flight,
    )  # fmt: skip
    outs = [Out("workers", worker_id, beat)]
    if kind is WorkerHeartbeat:
        outs += [Out("gate", worker_id, beat, partition=p) for p in range(topics.GATE.partitions)]
    return outs


def worker_started(worker_id: str, role: str) -> Out:
    return Out(
        "workers",
        worker_id,
        WorkerStarted(
            event_id=ids.new_id(), occurred_at=utcnow(), worker_id=worker_id, role=role,
            hostname=socket.gethostname(), pid=os.getpid(), version=__version__,
        ),
    )  # fmt: skip


def register(streams: Streams) -> ChainCore:
    app = streams.app
    config = streams.config
    table = app.Table(
        topics.CHAINS_TABLE,
        default=None,
        key_type=bytes,
        value_type=bytes,
        partitions=topics.RESPONSES.partitions,
    )
    keys = Utf8Keys(table)
    state = WriteBehind(keys)
    reader = BodyReader(config.kafka)
    worker_id = f"{ROLE}:{socket.gethostname()}:{os.getpid()}:{ids.new_id()[:8]}"
    core = ChainCore(
        state,
        KafkaBodies(streams, reader),
        worker_id,
        clock=utcnow,
        step_deadline=timedelta(milliseconds=config.liveness.processing_timeout_ms),
    )
    assigned: dict[str, Any] = {"partitions": set(), "adopt": False}

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _assigned(sender: Any, assigned_tps: Any = None, **kwargs: Any) -> None:
        tps = assigned_tps if assigned_tps is not None else kwargs.get("assigned", set())
        assigned["partitions"] = {tp.partition for tp in tps if tp.topic == topics.RESPONSES.name}
        assigned["adopt"] = True
        core.forget()

    @app.agent(streams.bind(topics.RESPONSES), name="chains")
    async def chains(stream: StreamT[Any]) -> None:
        async for event in streams.events(stream.events()):
            message, reason = decode_or_none(codec.chain_events, event.value)
            if message is None:
                await streams.dead_letter(event, reason or "undecodable")
                continue
            key = event.key.decode("utf-8", "replace") if isinstance(event.key, bytes) else None
            if key != message.response_id:
                await streams.dead_letter(event, f"must be keyed by '{message.response_id}'")
                continue
            backoff = _BACKOFF_FIRST_S
            while True:
                held = dict(core.held)
                try:
                    outs: list[Out] = []
                    if assigned["adopt"]:
                        # The table has recovered by the time the stream runs again.
                        outs += core.adopt(assigned["partitions"])
                    outs += await core.handle(message, event.message.partition)
                    if outs:
                        await streams.publish(outs, wait=True)
                    state.flush()
                    await streams.send_changelog(event.message.partition, keys)
                    assigned["adopt"] = False
                    break
                except BROKER_AWAY as exc:
                    # The broker is away: decide again once it is back (same facts, same ids).
                    state.discard()
                    core.held = held
                    log.warning("chain agent: %r; retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX_S)
                except Exception as exc:
                    # A defect triggered by one event must not stop every chain of the partition.
                    log.exception("chain agent could not apply %s", type(message).__name__)
                    state.discard()
                    core.held = held
                    await streams.dead_letter(event, f"chain agent could not apply it: {exc!r}")
                    break

    @app.task
    async def announce() -> None:
        await reader.start()
        await streams.publish([worker_started(worker_id, ROLE)], wait=True)
        await streams.publish(worker_events(worker_id, ROLE, WorkerHeartbeat), wait=True)

    @app.timer(interval=config.executor.heartbeat_interval_ms / 1000)
    async def heartbeat() -> None:
        outs = worker_events(worker_id, ROLE, WorkerHeartbeat, in_flight=len(core.held))
        if assigned["adopt"] and not app.rebalancing:
            # No event came since the assignment: take over the idle partitions' chains too.
            assigned["adopt"] = False
            outs += core.adopt(assigned["partitions"])
        else:
            outs += core.holding()
        await streams.publish(outs)
        # After the beat, which must not wait on the payload reads this may make.
        copies = await core.overdue()
        metrics.STEPS_HANDED_OUT_AGAIN.inc(len(copies))
        await streams.publish(copies)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def stopping(sender: Any, *args: Any, **kwargs: Any) -> None:
        # Only the daemon record says so: the gate keeps the heads' claims, which the next
        # holder of the partitions takes over (a WorkerStopped to the gate would reclaim
        # them, costing each a retry).
        await streams.publish(worker_events(worker_id, ROLE, WorkerStopped), wait=True)
        await reader.stop()

    return core
