"""An uploaded file's lines on a database of their own, fed records by hand: a new upload's
lines and the same lines met again (a replay over existing tables, or a retried upload under
the same file id) must end as one row per line, holding the last record's values."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import asyncpg
import pytest
from aiokafka.structs import ConsumerRecord

from compose import stack
from schemas import bodies, codec, topics
from schemas.bodies import BodyRef
from schemas.events import FileUploaded, TemplateMeta, TemplatesAppended, UploadAbandoned
from tests.integration.conftest import apply_polls, consumer_record, own_database, run

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LINES = 2_000


@pytest.fixture(scope="module")
def dsn(stack_info: stack.StackInfo) -> Iterator[str]:
    yield from own_database(stack_info, "file_projection")


def _upload(file_id: str, prefix: str, offset: int) -> list[ConsumerRecord]:
    """The file's two chunks of lines, then the file: custom ids ``<prefix>-<line>``."""
    half = LINES // 2
    events: list[TemplatesAppended | FileUploaded] = [
        TemplatesAppended(
            event_id=f"t{first}",
            occurred_at=T0,
            file_id=file_id,
            first_line=first,
            body_key=f"tplc:{file_id}:u:{first}",
            body=BodyRef(0, first),
            templates=[
                TemplateMeta(f"{prefix}-{first + i}", "POST", "/v1/chat/completions", "m", 10)
                for i in range(half)
            ],
        )  # fmt: skip
        for first in (0, half)
    ]
    events.append(
        FileUploaded(
            event_id="f",
            occurred_at=T0,
            file_id=file_id,
            owner="u",
            filename="a.jsonl",
            purpose="batch",
            bytes=100,
            created_at=T0,
            expires_at=None,
            template_count=LINES,
        )  # fmt: skip
    )
    return [
        consumer_record(topics.FILES.name, offset + i, file_id.encode(), codec.encode(event))
        for i, event in enumerate(events)
    ]


async def _apply_and_read(dsn: str, *polls: list[ConsumerRecord]) -> list[tuple[int, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        await apply_polls(conn, *polls)
        rows = await conn.fetch(
            "SELECT line_number, custom_id FROM request_templates WHERE file_id = $1"
            " ORDER BY line_number",
            uuid.UUID(polls[0][0].key.decode()),
        )
        return [(r["line_number"], r["custom_id"]) for r in rows]
    finally:
        await conn.close()


def test_a_new_upload_projects_every_line(dsn: str) -> None:
    file_id = str(uuid.uuid4())
    rows = run(_apply_and_read(dsn, _upload(file_id, "a", 0)))
    assert rows == [(n, f"a-{n}") for n in range(LINES)]


def test_lines_met_again_are_one_row_each_with_the_last_values(dsn: str) -> None:
    file_id = str(uuid.uuid4())
    first = _upload(file_id, "a", 0)
    # The same lines replayed, a later attempt's lines in the same poll, then the first
    # half of the first attempt once more: the last record of each line wins.
    again = first + _upload(file_id, "b", len(first))
    rows = run(_apply_and_read(dsn, first, again, first[:1]))
    half = LINES // 2
    assert rows == [(n, f"a-{n}") for n in range(half)] + [(n, f"b-{n}") for n in range(half, LINES)]  # fmt: skip


def _abandoned(file_id: str) -> list[ConsumerRecord]:
    """Upload A appended both halves and failed; a retry B under the same file id had appended
    the first half over A's lines by then (custom ids ``b-<line>``)."""
    a, b, half = str(uuid.uuid4()), str(uuid.uuid4()), LINES // 2

    def appended(upload: str, first: int) -> TemplatesAppended:
        prefix = "a" if upload == a else "b"
        return TemplatesAppended(
            event_id=f"{upload}-{first}", occurred_at=T0, file_id=file_id, first_line=first,
            body_key=bodies.chunk_key(file_id, upload, first), body=BodyRef(0, first),
            templates=[
                TemplateMeta(f"{prefix}-{first + i}", "POST", "/v1/chat/completions", "m", 10)
                for i in range(half)
            ],
        )  # fmt: skip

    events: list[TemplatesAppended | UploadAbandoned] = [
        appended(a, 0),
        appended(a, half),
        appended(b, 0),
    ]
    events.append(UploadAbandoned(event_id="x", occurred_at=T0, file_id=file_id, upload_id=a))
    return [
        consumer_record(topics.FILES.name, i, file_id.encode(), codec.encode(event))
        for i, event in enumerate(events)
    ]


def test_an_abandoned_upload_takes_its_own_lines_only(dsn: str) -> None:
    b_lines = [(n, f"b-{n}") for n in range(LINES // 2)]
    assert run(_apply_and_read(dsn, _abandoned(str(uuid.uuid4())))) == b_lines
    by_poll = [[record] for record in _abandoned(str(uuid.uuid4()))]
    assert run(_apply_and_read(dsn, *by_poll)) == b_lines
