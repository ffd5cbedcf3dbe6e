"""What the Files and Batches endpoints make of odd but well-formed input: a client error, never
a 500 (§8.2)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
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


async def test_a_multipart_part_in_an_unknown_charset_is_a_400() -> None:
    async def handler(request: web.Request) -> web.Response:
        try:
            await _read_multipart(request)
        except ApiError as exc:
            return web.Response(status=exc.status, text=exc.message)
        return web.Response(text="read")

    app = web.Application()
    app.router.add_post("/", handler)
    boundary = "XyZ"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n'
        "Content-Type: text/plain; charset=x-nope\r\n\r\nbatch\r\n"
        f"--{boundary}--\r\n"
    )
    async with TestClient(TestServer(app)) as client:
        answer = await client.post(
            "/", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        assert answer.status == 400
        assert "Invalid multipart request" in await answer.text()


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
