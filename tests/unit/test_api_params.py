"""What the Files and Batches endpoints make of odd but well-formed input: a client error, never
a 500 (§8.2)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from projections.api.batches import parse_time
from projections.api.files import _read_multipart
from schemas.errors import ApiError


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
