"""The gate agent: one stream of everything a model partition hears, folded by :class:`Gate`.

It reads the gate topic (population, executor reports, batch control, ticks, heartbeats) and
the model-filters topic together. Both are keyed by model with one partition count, so a
model's rows, claims and reports all arrive at one worker, in order, and its table changelog
lands on the same partition number. The gate is the only writer of the request lifecycle.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import timedelta
from typing import Any, NoReturn, cast

from faust.types import EventT, StreamT

from schemas import codec, ids, topics
from schemas.events import GateTick
from streams.app import Streams, decode_or_none, utcnow
from streams.changelog_follower import ChangelogFollower
from streams.emit import Out
from streams.gate.core import Gate, Liveness
from streams.metrics import Backlog
from streams.recovery_watch import end_worker
from streams.tables import Utf8Keys, WriteBehind

log = logging.getLogger(__name__)

TICK_INTERVAL_S = 1.0


def register(streams: Streams) -> Gate:
    app = streams.app
    config = streams.config
    table = app.Table(
        topics.GATE_TABLE,
        default=None,
        key_type=bytes,
        value_type=bytes,
        partitions=topics.GATE_PARTITIONS,
    )
    limits = {name: model.concurrency for name, model in config.models.items()}
    live = config.liveness
    keys = Utf8Keys(table)
    state = WriteBehind(keys)
    gate = Gate(
        state,
        limits,
        f"gate:{socket.gethostname()}:{os.getpid()}",
        config=config.gate,
        liveness=Liveness(
            claim_timeout=timedelta(milliseconds=live.claim_timeout_ms),
            processing_timeout=timedelta(milliseconds=live.processing_timeout_ms),
            stale_worker=timedelta(milliseconds=live.stale_daemon_threshold_ms),
            max_retries=config.executor.max_retries,
        ),
    )
    rebuild = {"needed": True}
    hooks = streams.metrics
    Backlog(gate.backlog, hooks).register()

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _assigned(sender: Any, *args: Any, **kwargs: Any) -> None:
        # Tables recover before the stream resumes; derive the indexes on the next event.
        rebuild["needed"] = True

    source = app.topic(
        topics.GATE.name, topics.MODEL_FILTERS.name, key_type=bytes, value_type=bytes
    )
    watch = streams.watch_stalls(source)

    def _restart(exc: BaseException) -> NoReturn:
        # An input left unacknowledged would hold every later commit of its partition, and a
        # decision that did not land leaves the table ahead of the log: a fresh worker takes the
        # inputs again from the commit, its table from the changelog.
        log.critical("gate: %r; restarting from the commit and the changelog", exc)
        end_worker()

    follower = ChangelogFollower(
        lambda partition, changes: streams.send_changes(keys, partition, changes), _restart
    )

    async def take(event: EventT[Any]) -> None:
        watch.took(event.message.tp, event.message.offset)
        partition = event.message.partition
        message, reason = decode_or_none(codec.gate_inputs, event.value)
        if message is None:
            await streams.dead_letter(event, reason or "undecodable")
            await follower.hand_over(event, partition, (), [])
            return
        if rebuild["needed"]:
            gate.rebuild()
            rebuild["needed"] = False
        gate.partition = partition
        started = time.perf_counter()
        try:
            outs = gate.handle(message, utcnow())
        except Exception as exc:
            # A defect triggered by one input must not stop the model's gate for good.
            log.exception("gate could not apply %s", type(message).__name__)
            state.discard()
            gate.rebuild()
            await streams.dead_letter(event, f"gate could not apply it: {exc!r}")
            await follower.hand_over(event, partition, (), [])
            return
        decided = time.perf_counter() - started
        # The changelog goes once the decisions are acknowledged: one that landed ahead of them
        # (a batch lingering apart, another broker) would leave a gate killed in between sure
        # of what nobody was told, and the rows it moved on stuck for good in the read model.
        # The follower waits for that, so the next input need not.
        sent = await streams.send(outs)
        hooks.gate_published(outs, decided)
        state.flush()
        await follower.hand_over(event, partition, sent, keys.take())

    @app.agent(source, name="gate")
    async def gate_agent(stream: StreamT[Any]) -> None:
        # Acknowledged by hand, by the follower, once what an input decided is on record.
        async for event in streams.events(cast(Any, stream).noack().events(), acks=False):
            try:
                await take(event)
            except Exception as exc:
                _restart(exc)

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
