"""Tombstones for body records: where each key lives, and sending them; and the abandon of
uploads whose chunks the purge reaps."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from projections.api.publisher import Publisher
from schemas import bodies, ids, topics
from schemas.commands import AbandonUpload


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


async def abandon(publisher: Publisher, uploads: Sequence[tuple[str, str]]) -> None:
    """Send ``AbandonUpload`` for each (file id, upload id) and wait for every acknowledgement."""
    now = datetime.now(UTC)
    await publisher.commands(
        [
            AbandonUpload(command_id=ids.new_id(), issued_at=now, file_id=f, upload_id=u)
            for f, u in uploads
        ]
    )
