"""In-memory stand-ins for the chain agent's and step executor's Kafka I/O."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from schemas.bodies import BodyRef
from schemas.events import StepWork
from streams.chains.core import BodyRecord, PayloadUnavailable
from streams.emit import Out


class MemoryBodies:
    """The bodies topic as one list: a ref's offset is the record's index."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes]] = []
        self.published: list[Out] = []

    async def write_bodies(self, records: Sequence[BodyRecord]) -> list[BodyRef]:
        refs = []
        for record in records:
            self.records.append((record.key, record.value))
            refs.append(BodyRef(record.partition, len(self.records) - 1))
        return refs

    async def read_body(self, ref: BodyRef) -> bytes:
        if not 0 <= ref.offset < len(self.records):
            raise PayloadUnavailable(f"nothing at {ref.offset}")
        return self.records[ref.offset][1]

    async def publish(self, outs: Sequence[Out]) -> None:
        self.published.extend(outs)

    def put(self, key: str, value: Any) -> BodyRef:
        raw = value if isinstance(value, bytes) else msgspec.json.encode(value)
        self.records.append((key, raw))
        return BodyRef(0, len(self.records) - 1)

    def json(self, ref: BodyRef) -> Any:
        return msgspec.json.decode(self.records[ref.offset][1])

    def latest(self, key: str) -> bytes | None:
        found = [value for k, value in self.records if k == key]
        return found[-1] if found else None


def of_type(outs: Sequence[Out], kind: type) -> list[Any]:
    return [o.value for o in outs if isinstance(o.value, kind)]


def works(outs: Sequence[Out]) -> list[StepWork]:
    return of_type(outs, StepWork)
