"""The user CLI's pure parts (rate and ETA, arguments) and the dashboard's minute series."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click
import msgspec
import pytest
from click.testing import CliRunner

from cannonade.api_client import Batch, base_url
from cannonade.cli import main
from cannonade.cli_user import parse_metadata, when
from cannonade.watch import Estimate, clock, line
from projections.api.dashboard.stats import BUCKET_S, BUCKETS, first_minute, series
from schemas.api_dashboard import Throughput


def test_rate_and_eta_come_from_the_recent_samples_only() -> None:
    estimate = Estimate(window_s=30)
    assert estimate.rate() is None and estimate.eta_s(100) is None
    estimate.add(0.0, 0)
    estimate.add(10.0, 10)
    assert estimate.rate() == pytest.approx(1.0)
    assert estimate.eta_s(100) == pytest.approx(90.0)
    # A faster pace later: samples older than the window stop counting.
    estimate.add(40.0, 40)
    estimate.add(50.0, 90)
    assert estimate.rate() == pytest.approx(80 / 40)
    assert estimate.eta_s(100) == pytest.approx(5.0)


def test_a_stalled_batch_has_no_eta() -> None:
    estimate = Estimate()
    estimate.add(0.0, 5)
    estimate.add(3.0, 5)
    assert estimate.rate() == 0 and estimate.eta_s(10) is None
    assert clock(None) == "-:--"
    assert clock(65.4) == "1:05" and clock(3725) == "1:02:05"


def test_the_plain_progress_line_names_every_count() -> None:
    batch = msgspec.convert(
        {"id": "b", "status": "in_progress", "endpoint": "/v1/chat/completions",
         "completion_window": "24h", "created_at": 0, "unknown_later_field": 1,
         "request_counts": {"total": 40, "completed": 9, "failed": 1}},
        Batch,
    )  # fmt: skip
    estimate = Estimate()
    estimate.add(0.0, 0)
    estimate.add(2.0, 10)
    assert line(batch, estimate) == "in_progress: 9/40 completed, 1 failed, 5.0 req/s, ETA 0:06"


def test_api_urls_are_taken_with_or_without_v1_and_metadata_as_pairs() -> None:
    assert base_url("http://h:8080/v1/") == base_url("http://h:8080") == "http://h:8080"
    assert parse_metadata(("team=a", "note=x=y")) == {"team": "a", "note": "x=y"}
    assert parse_metadata(()) is None
    with pytest.raises(click.BadParameter):
        parse_metadata(("novalue",))


def test_listed_times_are_utc_whatever_the_machine_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert when(0) == "1970-01-01 00:00:00Z"
        assert when(1_700_000_000.9) == "2023-11-14 22:13:20Z"
        assert when(None) == "-"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_the_throughput_series_has_every_minute_of_the_hour_oldest_first() -> None:
    now = datetime(2026, 1, 1, 12, 30, 42, tzinfo=UTC)
    start = first_minute(now)
    assert start == int(datetime(2026, 1, 1, 11, 31, tzinfo=UTC).timestamp())
    current = start + (BUCKETS - 1) * BUCKET_S
    rows = [
        {"minute": current, "completed": 7, "failed": 1, "p50": 0.123456, "p99": 0.9},
        {"minute": start, "completed": 0, "failed": 2, "p50": None, "p99": None},
    ]
    points = series(rows, now)
    assert [p.minute for p in points] == list(range(start, current + 1, BUCKET_S))
    assert (points[0].failed, points[0].latency_p50_s) == (2, None)
    assert (points[-1].completed, points[-1].latency_p50_s, points[-1].latency_p99_s) == (7, 0.1235, 0.9)  # fmt: skip
    assert all(p.completed == p.failed == 0 for p in points[1:-1])
    doc = msgspec.json.encode(Throughput(object="dashboard.throughput", bucket_s=60, data=points))
    assert msgspec.json.decode(doc, type=Throughput).data == points


def test_the_demo_says_what_it_needs_where_the_sdk_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, "openai", None)  # as on an install without the dev extras
    monkeypatch.delitem(sys.modules, "compose.demo", raising=False)
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 1
    assert "needs the development extras (openai is missing)" in result.output


def test_the_status_filters_offered_are_the_ones_the_api_takes() -> None:
    from cannonade.cli_user import BATCH_STATUSES
    from projections.queries import STATUS_FILTERS

    assert set(BATCH_STATUSES) == set(STATUS_FILTERS)


class _NotTheApi(BaseHTTPRequestHandler):
    """What answers on a wrong port: a web page, 200."""

    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        body = b"<html>log in</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def not_the_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotTheApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _NotTheApi.hits = 0
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("args", "key", "says"),
    [
        (["batch", "list"], "sk-1", "is not the API's"),
        (["keys", "list"], "sk-1", "is not the API's"),
        (["batch", "list"], "sk-\xa01", "a character a header cannot carry"),
    ],
)
def test_a_wrong_address_or_key_is_an_error_message_not_a_traceback(
    not_the_api: str, args: list[str], key: str, says: str
) -> None:
    result = CliRunner().invoke(main, [*args, "--api-url", not_the_api, "--api-key", key])
    assert result.exit_code == 1 and says in result.output, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_an_output_directory_that_cannot_be_made_fails_before_the_wait(
    not_the_api: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(
        main,
        [
            "batch",
            "watch",
            "b",
            "--output",
            str(blocker / "sub"),
            "--api-url",
            not_the_api,
            "--api-key",
            "sk-1",
        ],  # fmt: skip
    )
    assert result.exit_code == 1 and "cannot write results into" in result.output
    assert _NotTheApi.hits == 0  # nothing was followed first


def test_an_api_slower_than_the_client_is_told_apart_from_one_that_is_down() -> None:
    from cannonade.api_client import Client, ClientError
    from cannonade.config import ApiConfig

    quiet = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        url = f"http://127.0.0.1:{quiet.getsockname()[1]}"
        with Client(url, "sk-1", timeout_s=0.2) as client, pytest.raises(ClientError) as info:
            client.batch("b")
        assert "may have been done" in str(info.value)
    finally:
        quiet.close()
    # By default the client outwaits the API's own wait for its writes to show.
    (default,) = Client.__init__.__defaults__ or (0,)
    assert default > ApiConfig().projection_wait_s
