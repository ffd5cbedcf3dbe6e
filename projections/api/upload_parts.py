"""An upload's parts on their way out while the rest of the file is still being parsed.

Each chunk of parsed lines goes to the bodies topic, and the ``AppendFileLines`` naming it to
the commands topic once the broker has the chunk, in line order, so the commands agent and the
projector take on the first lines while the API parses the last. Nothing is visible before
``CreateFile``; an upload that fails after parts went out tombstones their chunks and sends
``AbandonUpload``, which voids their templates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from projections import tombstones
from projections.api.publisher import Publisher
from projections.rules.upload import ParsedLine
from schemas import bodies, ids, topics
from schemas.bodies import BodyRef
from schemas.commands import AnyCommand, AppendFileLines, CreateFile, FileLine
from schemas.errors import ApiError


class UploadParts:
    def __init__(self, publisher: Publisher, file_id: str, upload_id: str, now: datetime) -> None:
        self.publisher = publisher
        self.file_id, self.upload_id, self.now = file_id, upload_id, now
        self.lines = 0
        self._sends: list[asyncio.Future[list[BodyRef]]] = []
        self._parts: list[tuple[str, int, list[FileLine]]] = []  # (chunk key, first line, lines)
        self._added = asyncio.Event()
        self._appender: asyncio.Future[None] | None = None
        self._appended = 0  # parts whose AppendFileLines went out (or may have)
        self._create: CreateFile | None = None

    def add(self, lines: Sequence[ParsedLine]) -> None:
        """Send a chunk of consecutive lines; the command that appends them follows."""
        first = lines[0].line_number
        key = bodies.chunk_key(self.file_id, self.upload_id, first)
        record = (
            key,
            bodies.encode_chunk([(line.custom_id, line.body) for line in lines]),
            bodies.partition_for(self.file_id, topics.BODIES.partitions),
        )
        metas = [FileLine(x.custom_id, "POST", x.url, x.model, len(x.body)) for x in lines]
        self._parts.append((key, first, metas))  # not the record: its bytes are sent
        self._sends.append(asyncio.ensure_future(self.publisher.bodies([record])))
        self.lines += len(lines)
        self._wake()

    def _wake(self) -> asyncio.Future[None]:
        """Tell the appender there is more to send, starting it on the first call."""
        self._added.set()
        if self._appender is None:
            self._appender = asyncio.ensure_future(self._append())
        return self._appender

    async def _append(self) -> None:
        """Append the parts in line order (the agent refuses one out of order), each send
        taking every part whose chunk the broker has by then (one round trip for several when
        the broker or the agent is slower than the parse), and ``CreateFile`` with the last."""
        while True:
            while self._appended == len(self._sends) and self._create is None:
                self._added.clear()
                await self._added.wait()
            commands: list[AnyCommand] = []
            if self._appended < len(self._sends):
                await self._sends[self._appended]
                ready = self._appended + 1
                while ready < len(self._sends) and self._sends[ready].done():
                    ready += 1
                commands += [self._command(i) for i in range(self._appended, ready)]
                self._appended = ready
            create = self._create if self._appended == len(self._sends) else None
            if create is not None:
                commands.append(create)
            await self.publisher.commands(commands)
            if create is not None:
                return

    def _command(self, i: int) -> AppendFileLines:
        (key, first, metas), [ref] = self._parts[i], self._sends[i].result()
        return AppendFileLines(
            command_id=ids.new_id(),
            issued_at=self.now,
            file_id=self.file_id,
            upload_id=self.upload_id,
            first_line=first,
            body_key=key,
            body=ref,
            lines=metas,
        )

    async def finish(self, create: CreateFile) -> None:
        """Create the file once every part is appended."""
        self._create = create
        await self._wake()

    async def abandon(self) -> None:
        """Best effort, after a failure: stop what is in flight, tombstone the chunks and void
        the parts already appended. What this misses (the broker is the thing that failed)
        stays invisible, as no file names it, until the purge abandons it a day later."""
        pending: list[asyncio.Future[Any]] = [*self._sends]
        if self._appender is not None:
            pending.append(self._appender)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        try:
            await tombstones.send(self.publisher, [key for key, _, _ in self._parts])
            if self._appended:
                await tombstones.abandon(self.publisher, [(self.file_id, self.upload_id)])
        except ApiError:
            pass
