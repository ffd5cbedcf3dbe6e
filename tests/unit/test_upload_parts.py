"""An upload's parts on their way out, against a publisher whose acknowledgements the test
hands out: the commands agent must get the parts in line order whatever order the broker
acknowledges their chunks in, ``CreateFile`` only after all of them, and a failed upload
must tombstone every chunk and abandon what may have been appended."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast

import pytest

from projections.api.publisher import Publisher, unavailable
from projections.api.upload_parts import UploadParts
from projections.rules.upload import ParsedLine
from schemas import bodies
from schemas.bodies import BodyRef
from schemas.commands import AbandonUpload, AnyCommand, AppendFileLines, CreateFile
from schemas.errors import ApiError

FILE = "7b0f1c2e-3a4d-4e5f-8a9b-0c1d2e3f4a5b"
UPLOAD = "1f0e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


class FakePublisher:
    """Chunk sends wait until the test acknowledges them (``ack``) or fails them (``fail``);
    tombstones and commands are taken at once and remembered."""

    def __init__(self) -> None:
        self.pending: dict[str, asyncio.Future[list[BodyRef]]] = {}
        self.tombstoned: list[str] = []
        self.sends: list[list[AnyCommand]] = []  # each commands() call
        self.sent = asyncio.Event()
        self.changed = asyncio.Condition()  # a chunk send began

    async def bodies(self, records: Sequence[tuple[str, bytes | None, int]]) -> list[BodyRef]:
        if all(value is None for _, value, _ in records):
            self.tombstoned += [key for key, _, _ in records]
            return []
        [(key, _, _)] = records  # one chunk a send
        self.pending[key] = asyncio.get_running_loop().create_future()
        async with self.changed:
            self.changed.notify_all()
        return await self.pending[key]

    async def commands(self, commands: Sequence[AnyCommand]) -> None:
        self.sends.append(list(commands))
        self.sent.set()

    def ack(self, first_line: int, offset: int) -> None:
        self.pending[_key(first_line)].set_result([BodyRef(0, offset)])

    def fail(self, first_line: int) -> None:
        self.pending[_key(first_line)].set_exception(unavailable())


def _key(first_line: int) -> str:
    return bodies.chunk_key(FILE, UPLOAD, first_line)


def _lines(first: int, count: int) -> list[ParsedLine]:
    return [
        ParsedLine(n, f"c{n}", "POST", "/v1/chat/completions", b'{"model":"m"}', "m")
        for n in range(first, first + count)
    ]


def _create(lines: int) -> CreateFile:
    return CreateFile(
        command_id="c", issued_at=NOW, file_id=FILE, upload_id=UPLOAD, owner="u",
        filename="f.jsonl", purpose="batch", bytes=1, line_count=lines, expires_at=None,
    )  # fmt: skip


async def _started(publisher: FakePublisher, *first_lines: int) -> None:
    """Until the chunks starting at ``first_lines`` are being sent."""

    async with publisher.changed:
        await asyncio.wait_for(
            publisher.changed.wait_for(
                lambda: all(_key(n) in publisher.pending for n in first_lines)
            ),
            5,
        )


async def test_parts_acknowledged_out_of_order_are_appended_in_line_order_then_the_file() -> None:
    publisher = FakePublisher()
    parts = UploadParts(cast(Publisher, publisher), FILE, UPLOAD, NOW)
    for first, count in ((0, 2), (2, 2), (4, 1)):
        parts.add(_lines(first, count))
    await _started(publisher, 0, 2, 4)
    finished = asyncio.ensure_future(parts.finish(_create(5)))
    publisher.ack(4, 12)
    publisher.ack(2, 11)
    await asyncio.sleep(0)
    assert publisher.sends == []  # line 0 first: nothing may go out before it
    publisher.ack(0, 10)
    await finished
    # Every part the broker had by then went in one send, CreateFile with the last.
    [sent] = publisher.sends
    appends = [c for c in sent if isinstance(c, AppendFileLines)]
    assert [(a.first_line, a.body, a.body_key) for a in appends] == [
        (0, BodyRef(0, 10), _key(0)),
        (2, BodyRef(0, 11), _key(2)),
        (4, BodyRef(0, 12), _key(4)),
    ]
    assert [len(a.lines) for a in appends] == [2, 2, 1]
    assert isinstance(sent[-1], CreateFile) and len(sent) == 4
    assert publisher.tombstoned == []


async def test_a_failed_chunk_send_fails_the_upload_which_tombstones_and_abandons() -> None:
    publisher = FakePublisher()
    parts = UploadParts(cast(Publisher, publisher), FILE, UPLOAD, NOW)
    parts.add(_lines(0, 2))
    await _started(publisher, 0)
    publisher.ack(0, 10)
    await asyncio.wait_for(publisher.sent.wait(), 5)  # the first part went out
    parts.add(_lines(2, 2))
    await _started(publisher, 2)
    publisher.fail(2)
    with pytest.raises(ApiError) as failed:
        await parts.finish(_create(4))
    assert failed.value.status == 503
    await parts.abandon()
    assert sorted(publisher.tombstoned) == sorted([_key(0), _key(2)])
    sent = [c for send in publisher.sends for c in send]
    assert [type(c) for c in sent] == [AppendFileLines, AbandonUpload]
    assert not any(isinstance(c, CreateFile) for c in sent)


async def test_an_upload_refused_before_any_part_went_out_abandons_nothing() -> None:
    publisher = FakePublisher()
    parts = UploadParts(cast(Publisher, publisher), FILE, UPLOAD, NOW)
    parts.add(_lines(0, 2))
    await _started(publisher, 0)
    await parts.abandon()  # a later line failed while the first chunk was still in flight
    assert publisher.tombstoned == [_key(0)]
    assert publisher.sends == []
