"""Starts one worker role as a Faust worker process."""

from __future__ import annotations

import logging
from pathlib import Path

import faust

from cannonade.config import Config
from streams.agents import chains, commands, executor, gate, steps
from streams.app import Streams

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


def run(role: str, config: Config, loglevel: str = "info") -> None:
    Path(config.data_dir).mkdir(parents=True, exist_ok=True)
    streams = build(role, config)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    faust.Worker(streams.app, loglevel=loglevel, quiet=True).execute_from_commandline()
