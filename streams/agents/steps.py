"""The step executor: a second agent of the ``executor`` role, on ``cannonade.step-work.v1``.

Runs chain steps with :class:`~streams.chains.runner.StepRunner`: each step is its own task,
so the tool calls of one round run concurrently. A work item is acknowledged by hand once its
outcome is on Kafka, so its offset commits only then and the work of a worker that dies
mid-step is redelivered (and found abandoned by the ledger, never fired twice). While a
rebalance or a stop is under way the offsets of running steps are let go, so that slow calls
hold neither the group nor the stop: those steps still finish and report from here, and at a
stop the ones still running after a short grace are reported abandoned.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any, cast

from faust.types import StreamT

from schemas import codec, ids, topics
from streams.agents.chains import KafkaBodies
from streams.app import BROKER_AWAY, Streams, decode_or_none
from streams.chains.ledger import KafkaLedger
from streams.chains.runner import AiohttpTools, StepRunner
from streams.execution.bodies import BodyReader
from streams.execution.client import AiohttpTransport, Timeouts

log = logging.getLogger(__name__)

_REBALANCE_POLL_S = 0.2
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.2, 5.0


def register(streams: Streams) -> StepRunner:
    app = streams.app
    config = streams.config
    e = config.executor
    reader = BodyReader(config.kafka)
    ledger = KafkaLedger(config.kafka)
    models = AiohttpTransport()
    tools = AiohttpTools()
    runner = StepRunner(
        KafkaBodies(streams, reader),
        ledger,
        models,
        tools,
        config,
        timeouts=Timeouts(
            first_chunk_ms=e.first_chunk_timeout_ms,
            chunk_ms=e.chunk_timeout_ms,
            body_ms=e.body_timeout_ms,
        ),
        max_in_flight=e.max_in_flight,
    )
    worker_id = f"steps:{socket.gethostname()}:{os.getpid()}:{ids.new_id()[:8]}"
    log.info("step executor %s", worker_id)

    @app.agent(streams.bind(topics.STEP_WORK), name="steps")
    async def steps(stream: StreamT[Any]) -> None:
        # Acknowledged by hand (see the module docstring); StreamT does not declare noack.
        async for event in streams.events(cast(Any, stream).noack().events(), acks=False):
            work, reason = decode_or_none(codec.step_work, event.value)
            if work is None:
                await streams.dead_letter(event, reason or "undecodable")
                event.ack()
                continue
            backoff = _BACKOFF_FIRST_S
            while True:
                try:
                    await runner.accept(work, event.message.partition, event.ack)
                    break
                except BROKER_AWAY as exc:
                    # Nothing ran yet (or the start may have landed: the ledger then says so).
                    log.warning("step executor: %r; retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX_S)

    @app.task
    async def start() -> None:
        await reader.start()
        await ledger.start()

    # A stop waits for every taken input to be acknowledged before it says it is stopping
    # (Faust's wait_empty, then on_before_shutdown): without the let-go a slow step would hold
    # it for its whole call, past any supervisor's patience. Let go, the step has the runner's
    # grace to finish, then is reported abandoned from here. Let go as the stop begins, Faust
    # finds nothing to wait for; the poll below covers rebalances and steps taken after that.
    streams.stopping.append(runner.release)

    @app.task
    async def let_go_during_rebalances_and_stops() -> None:
        while True:
            await asyncio.sleep(_REBALANCE_POLL_S)
            if (app.rebalancing or app.should_stop) and runner.running:
                runner.release()

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def stopping(sender: Any, *args: Any, **kwargs: Any) -> None:
        await runner.stop()
        await ledger.stop()
        await reader.stop()
        await tools.close()
        await models.close()

    return runner
