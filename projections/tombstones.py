"""Tombstones for body records: where each key lives, and sending them."""

from __future__ import annotations

from collections.abc import Sequence

from projections.api.publisher import Publisher
from schemas import bodies, topics


def partition_of(key: str) -> int:
    """The partition of a body record, so its tombstone lands on it: a file's chunks sit with
    the file (``tplc:<file>:…``), every other body with the id after its kind (see who writes
    them in :mod:`schemas.bodies`)."""
    kind, _, rest = key.partition(":")
    aggregate = rest.split(":", 1)[0] if kind == bodies.CHUNK else rest
    return bodies.partition_for(aggregate, topics.BODIES.partitions)


async def send(publisher: Publisher, keys: Sequence[str]) -> None:
    """Tombstone ``keys`` on the bodies topic and wait for every acknowledgement."""
    if keys:
        await publisher.bodies([(key, None, partition_of(key)) for key in keys])
