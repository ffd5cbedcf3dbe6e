"""Pure rules behind retry, results and the requests listing (core §1.3.1, §2.3, §2.4)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from projections.rules.batches import Counts, shown_counts
from projections.rules.requests import (
    check_state,
    check_tiers,
    detail,
    duration_ms,
    parse_bool,
    parse_limit,
    parse_list,
    parse_skip,
    summary,
)
from projections.rules.results import more_to_come, result_line, shown_status, states_for
from projections.rules.retry import parse_request_ids, row_ranges
from schemas.api_requests import MAX_LIMIT
from schemas.commands import RowRanges
from schemas.errors import ApiError
from schemas.events import LineRange

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def error(call: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        call(*args)
    assert info.value.status == 400
    return info.value


# -- retry -----------------------------------------------------------------------------------


def test_row_ranges_groups_by_model_and_joins_consecutive_lines() -> None:
    rows = [("b", 7), ("a", 3), ("a", 1), ("a", 2), ("b", 5), ("a", 9), ("a", 2)]
    assert row_ranges(rows) == [
        RowRanges("a", [LineRange(1, 4), LineRange(9, 10)]),
        RowRanges("b", [LineRange(5, 6), LineRange(7, 8)]),
    ]
    assert row_ranges([]) == []


def test_row_ranges_encode_as_the_command_carries_them() -> None:
    encoded = msgspec.json.encode(row_ranges([("m", 0), ("m", 1), ("m", 4)]))
    assert encoded == b'[["m",[[0,2],[4,5]]]]'


def test_request_ids_accept_plain_and_output_line_forms_once_each() -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    given = {"request_ids": [a.upper(), f"batch_req_{b}", a]}
    assert parse_request_ids(given) == [a, b]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "request_ids is required"),
        ([], "request_ids is required"),
        ({"request_ids": []}, "request_ids must be a non-empty list of ids"),
        ({"request_ids": "x"}, "request_ids must be a non-empty list of ids"),
        ({"request_ids": [1]}, "request_ids must be a list of strings"),
        ({"request_ids": ["nope"]}, "Invalid request ID format: 'nope'"),
    ],
)
def test_request_ids_are_checked(body: Any, message: str) -> None:
    assert error(parse_request_ids, body).message == message


# -- frozen counts ---------------------------------------------------------------------------


def test_frozen_counts_replace_the_rows_counts() -> None:
    live = Counts(pending=2, in_progress=1, completed=3, failed=1, canceled=0)
    assert shown_counts(live, None) == live
    assert shown_counts(live, (5, 1, 1)) == Counts(0, 0, 5, 1, 1)


# -- results ---------------------------------------------------------------------------------


def test_result_statuses_and_their_filter() -> None:
    assert [shown_status(s) for s in ("pending", "claimed", "processing", "canceled")] == [
        "pending", "in_progress", "in_progress", "canceled",
    ]  # fmt: skip
    assert states_for(None) is None
    assert states_for("in_progress") == ["claimed", "processing"]
    assert states_for("canceled") == ["canceled"]
    err = error(states_for, "cancelled")
    assert err.param == "status"
    assert err.message == (
        "Invalid status filter 'cancelled'. Allowed values: "
        "pending, in_progress, completed, failed, canceled"
    )


def test_result_line_shape() -> None:
    line = result_line(
        request_id="r", custom_id="c", model="m", state="processing",
        input_body=b'{"model":"m","n":1}', response_body=None, error=None,
    )  # fmt: skip
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert msgspec.json.decode(line) == {
        "id": "r", "custom_id": "c", "model": "m", "input_body": {"model": "m", "n": 1},
        "response_body": None, "error": None, "status": "in_progress",
    }  # fmt: skip
    done = msgspec.json.decode(
        result_line(
            request_id="r",
            custom_id=None,
            model="m",
            state="completed",
            input_body=None,
            response_body='{\n  "ok": true\n}',
            error=None,
        )  # fmt: skip
    )
    assert done["response_body"] == {"ok": True} and done["input_body"] is None
    failed = msgspec.json.decode(
        result_line(
            request_id="r",
            custom_id="c",
            model="m",
            state="failed",
            input_body=b"{}",
            response_body="not json",
            error='{"type":"BatchTerminated"}',
        )  # fmt: skip
    )
    assert failed["error"] == '{"type":"BatchTerminated"}'  # the raw text
    assert failed["response_body"] == "not json"


# -- requests listing ------------------------------------------------------------------------


def test_skip_and_limit_follow_list_requests() -> None:
    assert (parse_skip(None), parse_limit(None)) == (0, 50)
    assert (parse_skip("7"), parse_limit("3")) == (7, 3)
    assert parse_limit(str(MAX_LIMIT * 10)) == MAX_LIMIT
    assert error(parse_skip, "-1").message == "skip must be >= 0"
    assert error(parse_limit, "0").message == "limit must be > 0"
    assert error(parse_limit, "-5").message == "limit must be > 0"
    assert error(parse_skip, "x").message == "skip must be an integer"
    assert error(parse_limit, "1" * 30).param == "limit"


def test_filters_are_checked() -> None:
    assert check_state("claimed") == "claimed"
    assert error(check_state, "cancelled").param == "status"
    assert check_tiers(["flex", "priority"]) == ["flex", "priority"]
    assert check_tiers(None) is None
    assert error(check_tiers, ["gold"]).message.startswith("Invalid service tier 'gold'")
    assert (parse_bool(None, "x"), parse_bool("TRUE", "x"), parse_bool("0", "x")) == (
        False, True, False,
    )  # fmt: skip
    assert error(parse_bool, "yes please", "active_first").param == "active_first"


def test_list_parameters() -> None:
    assert parse_list([]) is None
    assert parse_list(["a,b", " c ", ""]) == ["a", "b", "c"]
    assert parse_list([""]) == []  # present and empty: matches nothing


def row(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "r1", "model": "m", "state": "completed", "created_at": T0,
        "started_at": T0 + timedelta(seconds=1), "completed_at": T0 + timedelta(seconds=3.5),
        "failed_at": None, "response_status": 200, "service_tier": "flex",
        "body": b'{"model":"m"}', "response_body": b'{"ok":1}', "error": None,
    }  # fmt: skip
    return base | fields


def test_summary_and_detail() -> None:
    shown = msgspec.to_builtins(summary(row()))
    assert shown == {
        "id": "r1", "object": "request", "model": "m", "status": "completed",
        "created_at": int(T0.timestamp()), "completed_at": int(T0.timestamp()) + 3,
        "failed_at": None, "duration_ms": 2500, "response_status": 200, "service_tier": "flex",
    }  # fmt: skip
    full = detail(row())
    assert full.body == {"model": "m"} and full.response_body == {"ok": 1}
    assert full.error is None
    failed = detail(row(state="failed", completed_at=None, failed_at=T0, error=b"boom"))
    assert failed.error == "boom" and failed.duration_ms is None
    # A retried row's earlier outcome is not shown with its new state.
    again = detail(row(state="pending", completed_at=None, error=b"old"))
    assert again.response_body is None and again.error is None


def test_duration_needs_both_times() -> None:
    assert duration_ms(None, T0) is None and duration_ms(T0, None) is None
    assert duration_ms(T0, T0 + timedelta(milliseconds=1234)) == 1234


def _batch(**fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "pending": 0, "in_progress": 0, "completed": 3, "failed": 1, "canceled": 0, "total": 4,
        "requests_started_at": T0, "completed_at": T0, "failed_at": None, "cancelled_at": None,
    }  # fmt: skip
    return row | fields


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, False),  # every row ended and known
        ({"completed": 2, "in_progress": 1, "completed_at": None}, True),
        ({"completed": 2, "completed_at": None}, True),  # a row not projected yet
        (
            {
                "total": 0,
                "completed": 0,
                "failed": 0,
                "requests_started_at": None,
                "completed_at": None,
            },
            True,
        ),  # validating  # fmt: skip
        (
            {
                "total": 0,
                "completed": 0,
                "failed": 0,
                "requests_started_at": None,
                "completed_at": None,
                "failed_at": T0,
            },
            False,
        ),  # failed validation  # fmt: skip
    ],
)
def test_results_say_more_may_come_until_every_row_has_ended(fields: dict[str, Any], expected: bool) -> None:  # fmt: skip
    assert more_to_come(_batch(**fields)) is expected
