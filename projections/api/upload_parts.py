"""An upload's parts on their way out while the rest of the file is still being parsed.

Each chunk of parsed lines goes to the bodies topic, then the ``AppendFileLines`` naming it
goes to the commands topic once the chunk is acknowledged, in line order (one send at a time),
so the commands agent and the projector take on the first lines while the API parses the
last. Nothing is visible before ``CreateFile``; an upload that fails after parts went out
tombstones their chunks and sends ``AbandonUpload``, which voids their templates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from projections.api.publisher import Publisher
from projections.rules.upload import ParsedLine
from schemas import bodies, ids, topics
from schemas.bodies import BodyRef
from schemas.commands import AbandonUpload, AppendFileLines, CreateFile, FileLine
from schemas.errors import ApiError


class UploadParts:
    def __init__(self, publisher: Publisher, file_id: str, upload_id: str, now: datetime) -> None:
        self.publisher = publisher
        self.file_id, self.upload_id, self.now = file_id, upload_id, now
        self.lines = 0
        self._records: list[tuple[str, bytes, int]] = []  # the chunks, for the erasure
        self._sends: list[asyncio.Future[list[BodyRef]]] = []
        self._appends: list[asyncio.Future[None]] = []
        self._appended = False  # some AppendFileLines may be on the topic

    def add(self, lines: Sequence[ParsedLine]) -> None:
        """Send a chunk of consecutive lines and then the command that appends them."""
        first = lines[0].line_number
        key = bodies.chunk_key(self.file_id, self.upload_id, first)
        record = (
            key,
            bodies.encode_chunk([(line.custom_id, line.body) for line in lines]),
            bodies.partition_for(self.file_id, topics.BODIES.partitions),
        )
        self._records.append(record)
        metas = [FileLine(x.custom_id, "POST", x.url, x.model, len(x.body)) for x in lines]
        previous = self._appends[-1] if self._appends else None
        self._sends.append(asyncio.ensure_future(self.publisher.bodies([record])))
        self._appends.append(
            asyncio.ensure_future(self._append(previous, self._sends[-1], first, key, metas))
        )
        self.lines += len(lines)

    async def _append(
        self,
        previous: asyncio.Future[None] | None,
        sent: asyncio.Future[list[BodyRef]],
        first: int,
        key: str,
        metas: list[FileLine],
    ) -> None:
        [ref] = await sent
        if previous is not None:
            await previous  # in line order: the agent refuses a part out of order
        self._appended = True
        await self.publisher.commands(
            [
                AppendFileLines(
                    command_id=ids.new_id(),
                    issued_at=self.now,
                    file_id=self.file_id,
                    upload_id=self.upload_id,
                    first_line=first,
                    body_key=key,
                    body=ref,
                    lines=metas,
                )
            ]
        )

    async def finish(self, create: CreateFile) -> None:
        """Wait for every part, then create the file from them."""
        if self._appends:
            await self._appends[-1]
        await self.publisher.commands([create])

    async def abandon(self) -> None:
        """Best effort, after a failure: stop what is in flight, tombstone the chunks and void
        the parts already appended (what this misses, e.g. when the broker is the thing that
        failed, stays invisible: no file names it)."""
        pending: list[asyncio.Future[Any]] = [*self._sends, *self._appends]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        try:
            if self._records:
                await self.publisher.bodies([(k, None, p) for k, _, p in self._records])
            if self._appended:
                await self.publisher.commands(
                    [
                        AbandonUpload(
                            command_id=ids.new_id(),
                            issued_at=self.now,
                            file_id=self.file_id,
                            upload_id=self.upload_id,
                        )
                    ]
                )
        except ApiError:
            pass
