"""Bounds how long a Faust worker's fetch may wait on the broker.

faust-streaming hard-codes ``fetch_max_wait_ms=1500`` for its consumers. aiokafka keeps one
fetch in flight per broker and only adds a partition whose buffered records were consumed to
the *next* fetch, so a busy partition can sit behind a long-poll on idle ones for up to that
long. Every hop of the pipeline (gate → executor → gate) paid it, which capped throughput at
about 80 requests/s regardless of capacity. With batched records a busy partition rarely
waits behind an idle long-poll, so the bound can be 100 ms: every idle fetch costs the broker
CPU (20 ms meant 50 idle fetches a second per worker; 100 ms cut the broker's CPU per request
by about a quarter in `bench.baseline`, at no cost in throughput).
"""

from __future__ import annotations

from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka

FETCH_MAX_WAIT_MS = 100

_original = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer


def _create_worker_consumer(self: Any, transport: Any) -> Any:
    consumer = _original(self, transport)
    consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when the consumer starts
    return consumer


def install() -> None:
    faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer  # type: ignore[method-assign]
