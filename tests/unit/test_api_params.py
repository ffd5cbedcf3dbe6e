"""What the Files and Batches endpoints make of odd but well-formed input: a client error, never
a 500 (§8.2)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from projections import queries
from projections.api import batches
from projections.api.auth import Principal
from projections.api.batches import parse_time
from projections.api.files import _read_multipart
from schemas.errors import ApiError

BATCH = "1f0e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2025-01-01T00:00:00Z", datetime(2025, 1, 1, tzinfo=UTC)),
        ("2025-01-01T01:00:00+01:00", datetime(2025, 1, 1, tzinfo=UTC)),
        ("2025-01-01T00:00:00", datetime(2025, 1, 1, tzinfo=UTC)),  # no zone: UTC
    ],
)
def test_a_time_filter_is_read_in_utc(raw: str, expected: datetime) -> None:
    assert parse_time(raw, "created_after") == expected


@pytest.mark.parametrize("raw", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-05:00", "soon"])
def test_a_time_filter_utc_cannot_hold_is_a_400(raw: str) -> None:
    # The first two are valid RFC 3339 that fall outside the calendar once in UTC; the database
    # driver's conversion raised, a 500.
    with pytest.raises(ApiError) as info:
        parse_time(raw, "created_after")
    assert (info.value.status, info.value.param) == (400, "created_after")


async def _upload_answer(*parts: tuple[str, bytes], chunked: bool = False, limit: int = 1 << 20) -> tuple[int, str]:  # fmt: skip
    """(status, text) of an upload's form read: the fields it kept, or the error."""

    async def handler(request: web.Request) -> web.Response:
        try:
            fields = await _read_multipart(request, limit)
        except ApiError as exc:
            return web.Response(status=exc.status, text=exc.message)
        return web.Response(text=repr(sorted((k, len(v or "")) for k, v in fields.items())))

    app = web.Application()
    app.router.add_post("/", handler)
    boundary = "XyZ"
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
            + (b'; filename="a.jsonl"' if name == "file" else b"")
            + b"\r\n"
            + head
            + b"\r\n"
            for name, head in parts
        )
        + f"--{boundary}--\r\n".encode()
    )

    async def chunks() -> AsyncIterator[bytes]:
        for at in range(0, len(body), 1 << 16):
            yield body[at : at + (1 << 16)]

    async with TestClient(TestServer(app)) as client:
        answer = await client.post(
            "/", data=chunks() if chunked else body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )  # fmt: skip
        return answer.status, await answer.text()


async def test_an_upload_form_keeps_its_file_and_fields() -> None:
    status, text = await _upload_answer(
        ("purpose", b"\r\nbatch"), ("file", b"\r\n" + b"x" * 1000), ("note", b"\r\nignored")
    )
    assert (status, text) == (200, "[('file', 1000), ('filename', 7), ('purpose', 5)]")


async def test_a_multipart_part_in_an_unknown_charset_is_a_400() -> None:
    status, text = await _upload_answer(("purpose", b"Content-Type: text/plain; charset=x-nope\r\n\r\nbatch"))  # fmt: skip
    assert status == 400 and "Invalid multipart request" in text


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_upload_whose_parts_pass_the_limit_is_a_413_however_it_is_framed(chunked: bool) -> None:  # fmt: skip
    # Parts the upload does not read count too: they were each kept whole, without a bound
    # on the whole body when it came chunked (no Content-Length to refuse up front).
    many = [(f"junk{i}", b"\r\n" + b"j" * 300_000) for i in range(8)]
    assert (await _upload_answer(*many, chunked=chunked))[0] == 413
    big = ("file", b"\r\n" + b"x" * 1_100_000)
    assert (await _upload_answer(big, chunked=chunked))[0] == 413
    long = ("purpose", b"\r\n" + b"p" * 5000)
    assert (await _upload_answer(long, chunked=chunked)) == (400, "Invalid multipart request: 'purpose' is too long")  # fmt: skip


def _batch_row(**changes: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    row: dict[str, Any] = dict(
        id=BATCH, owner="alice", endpoint="/v1/chat/completions", input_file_id=BATCH,
        completion_window="24h", metadata=None, output_file_id=BATCH, error_file_id=BATCH,
        created_at=now, expires_at=now + timedelta(hours=24), requests_started_at=now,
        cancelling_at=None, cancelled_at=None, finalizing_at=None, completed_at=None,
        failed_at=None, errors_message=None, total=2, pending=0, in_progress=1, completed=1,
        failed=0, canceled=0, retry_version=0, counts_frozen_at=None, completed_requests=None,
        failed_requests=None, canceled_requests=None,
    )  # fmt: skip
    row.update(changes)
    return row


async def test_a_cancel_the_batch_s_end_beat_is_a_409(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch read in progress, its last row ends before the cancel reaches it: the cancel
    does nothing, and the caller hears so, as for a batch that had ended before it asked."""
    now = datetime.now(UTC)
    rows = iter([_batch_row(), _batch_row(in_progress=0, completed=2, completed_at=now, counts_frozen_at=now, completed_requests=2, failed_requests=0, canceled_requests=0)])  # fmt: skip
    sent: list[object] = []

    async def get_batch(pool: object, batch_id: str, owner: str) -> dict[str, Any]:
        return next(rows)

    class Publisher:
        async def commands(self, commands: list[object]) -> None:
            sent.extend(commands)

    class Context:
        pool, publisher = None, Publisher()

        async def wait_for(self, check: Callable[[], Awaitable[bool]], what: str) -> bool:
            return True  # what the projection showed: the batch's end

    monkeypatch.setattr(queries, "get_batch", get_batch)
    request = make_mocked_request("POST", f"/v1/batches/{BATCH}/cancel", match_info={"id": BATCH})
    monkeypatch.setattr(batches, "principal", lambda _: Principal(user="alice", key_id=BATCH))
    monkeypatch.setattr(batches, "context", lambda _: Context())
    with pytest.raises(ApiError) as info:
        await batches.cancel(request)
    assert (info.value.status, info.value.code) == (409, "invalid_state")
    assert "completed" in info.value.message and len(sent) == 1
