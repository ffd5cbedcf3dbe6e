"""What a decision publishes: an event, the catalog topic it goes to, and its key.

Domain code returns lists of :class:`Out`; only the agents turn them into Kafka sends, which
keeps every rule testable without a broker.
"""

from __future__ import annotations

from typing import Literal

import msgspec

TopicRole = Literal[
    "files",
    "batches",
    "requests",
    "gate",
    "dispatch",
    "bodies",
    "commands",
    "workers",
    "model_filters",
    "responses",
    "step_work",
]


class Out(msgspec.Struct, frozen=True):
    topic: TopicRole
    key: str
    # An event, or raw bytes (bodies); None is a tombstone.
    value: msgspec.Struct | bytes | None
    # Set to reach a given partition (heartbeats to each gate partition, dispatch spreading,
    # body records that must sit with their aggregate).
    partition: int | None = None
