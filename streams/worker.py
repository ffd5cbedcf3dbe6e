"""Starts one worker role as a Faust worker process, with its health and metrics server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faust
import mode
from aiohttp import web

from cannonade import health, heap, logs, metrics
from cannonade.config import Config
from streams.agents import chains, commands, executor, gate, steps
from streams.app import Streams
from streams.recovery_watch import RecoveryWatchdog

ROLES = ("commands", "gate", "executor", "chains")


def build(role: str, config: Config) -> Streams:
    if role not in ROLES:
        raise ValueError(f"unknown worker role '{role}'; expected one of {', '.join(ROLES)}")
    streams = Streams(role, config)
    if role == "commands":
        commands.register(streams)
    elif role == "gate":
        gate.register(streams)
    elif role == "chains":
        chains.register(streams)
    else:
        executor.register(streams)
        steps.register(streams)  # chain steps: the same upstreams, plus server-side tools
    return streams


class Worker(faust.Worker):
    """A Faust worker that remembers when it finished starting (the moment Faust logs
    "Ready": joined its group, tables recovered, agents running)."""

    started = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Faust drops its terminal spinner when it sets logging up, which it does not here
        # (override_logging=False); left on, it writes escape codes into the log.
        self.spinner = None

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        heap.freeze_startup()
        self.started = True


def stream_check(worker: Worker) -> health.Check:
    """Ready once started, and while no rebalance or table recovery is under way (until
    one ends the worker's partitions and tables are not its own to serve)."""

    async def check() -> str | None:
        app = worker.app
        if not worker.started:
            return "starting: joining the group and recovering tables"
        if app.rebalancing:
            return "rebalancing"
        if app.in_recovery:
            return "recovering tables"
        return None

    return check


class HealthServer(mode.Service):
    """/livez, /readyz and /metrics on their own port, up from the worker's first moment
    (so liveness answers during a long table recovery)."""

    def __init__(self, host: str, port: int, readiness: health.Readiness, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.host, self.port, self.readiness = host, port, readiness
        self._runner: web.AppRunner | None = None

    async def on_start(self) -> None:
        self._runner = await health.serve(self.host, self.port, self.readiness)

    async def on_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.readiness.close()


def run(role: str, config: Config, loglevel: str = "info") -> None:
    obs = config.observability
    logs.configure(role, obs.log_format, loglevel)
    metrics.announce(role)
    Path(config.data_dir).mkdir(parents=True, exist_ok=True)
    streams = build(role, config)
    readiness = health.Readiness()
    services: list[mode.ServiceT] = [RecoveryWatchdog(streams.app), *streams.services]
    port = obs.port_for(role)
    if port:
        services.append(HealthServer(obs.metrics_host, port, readiness))
    # Logging is ours (logs.configure): Faust must not replace the handler.
    worker = Worker(streams.app, *services, loglevel=loglevel, quiet=True, override_logging=False)
    kafka = health.KafkaCheck(config.kafka)
    readiness.add("kafka", kafka, kafka.close)
    readiness.add("stream", stream_check(worker))
    worker.execute_from_commandline()
