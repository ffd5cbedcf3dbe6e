"""The broker's own hop on the same box at the same time, as a floor for latencies that cross it.

A claim's latency in ``bench.claim_gate`` crosses the broker once (executor → gate). A bare
producer and consumer, in a process of their own so that the benchmark's polling does not
delay them, send a small record every 10 ms to a topic of their own and show what one hop
costs there and then, with no Cannonade code on either end:

- ``ack``: ``send`` → acknowledged (acks=all, as the workers produce);
- ``hop``: the record's timestamp (set by ``send``) → the consumer has it.

The topic is created for the run and deleted after it; its traffic is far below the workers'.

    python -m bench.broker_probe BOOTSTRAP   # prints "ready"; on stdin's end, the samples
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

INTERVAL_S = 0.01
Samples = dict[str, list[float]]  # "ack", "hop" -> milliseconds


class BrokerProbe:
    """Runs this module as a child process for as long as the figure is wanted."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.broker_probe", self.bootstrap,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self._proc.stdout is not None
        if (await self._proc.stdout.readline()).strip() != b"ready":
            raise RuntimeError(f"the broker probe did not start (exit {await self._proc.wait()})")

    async def stop(self) -> Samples:
        """End the probe and return its samples (none if it failed)."""
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.close()
        out, _ = await self._proc.communicate()
        return json.loads(out) if self._proc.returncode == 0 else {"ack": [], "hop": []}


async def _probe(bootstrap: str) -> Samples:
    topic = f"cannonade-bench-probe-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 1, 1)])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=100)
    acks: list[float] = []
    hops: list[float] = []

    async def send() -> None:
        while True:
            sent = time.perf_counter()
            await (await producer.send(topic, b"probe"))
            acks.append((time.perf_counter() - sent) * 1000)
            await asyncio.sleep(INTERVAL_S)

    async def receive() -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            now_ms = time.time() * 1000
            hops.extend(now_ms - r.timestamp for rs in batch.values() for r in rs)

    await producer.start()
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_end(partition)
        tasks = [asyncio.create_task(send()), asyncio.create_task(receive())]
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.read)  # until the parent closes our stdin
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await producer.stop()
        await consumer.stop()
        with contextlib.suppress(Exception):
            await admin.delete_topics([topic])
        await admin.close()
    return {"ack": acks, "hop": hops}


def main() -> None:
    print(json.dumps(asyncio.run(_probe(sys.argv[1]))))


if __name__ == "__main__":
    main()
