"""A Faust worker for the stall watchdog's test against the real broker: its agent notes every
record it takes in a file, until one whose value is ``hang``, after which it takes nothing.

    python -m tests.integration.stall_app BOOTSTRAP TOPIC TAKEN_FILE DATA_DIR
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import faust

from streams import fetch_guard, fetch_wait
from streams.stall_watch import StallWatchdog

STALL_S = 4.0
INTERVAL_S = 1.0


def main(bootstrap: str, topic_name: str, taken_file: str, data_dir: str) -> None:
    fetch_wait.install()  # as every worker of ours (streams.app.Streams)
    fetch_guard.install()
    app = faust.App(
        f"stall-test-{topic_name}",
        broker=f"kafka://{bootstrap}",
        web_enabled=False,
        datadir=data_dir,
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
    )
    topic = app.topic(topic_name, key_type=bytes, value_type=bytes)
    watch = StallWatchdog(app, topic.topics, stall_s=STALL_S, interval_s=INTERVAL_S)
    out = open(taken_file, "a", buffering=1)  # noqa: SIM115 - open for the worker's life

    @app.agent(topic)
    async def take(stream: Any) -> None:
        async for event in stream.events():
            watch.took(event.message.tp, event.message.offset)
            if event.value == b"hang":
                await asyncio.Event().wait()
            out.write(f"{event.message.offset}\n")

    faust.Worker(app, watch, loglevel="info", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main(*sys.argv[1:5])
