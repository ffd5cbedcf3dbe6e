"""Batch creation checks, status, the batch object and the listing filter (§8.4, core §1.3)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from projections.rules.batches import (
    BatchFacts,
    batch_object,
    check_status_filter,
    derive_status,
    validate_create_batch,
)
from schemas.errors import ApiError, invalid_api_key, invalid_request, not_found
from streams.validation import check_lines_match_endpoint

FILE_ID = "7b0f1c2e-3a4d-4e5f-8a9b-0c1d2e3f4a5b"
WINDOWS = ["24h", "1h"]
PATHS = ["/v1/chat/completions", "/v1/embeddings"]


def create(**fields: Any) -> bytes:
    body: dict[str, Any] = {
        "input_file_id": FILE_ID,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    body.update(fields)
    return msgspec.json.encode({k: v for k, v in body.items() if v is not ...})


def create_error(body: bytes, windows: list[str] = WINDOWS) -> ApiError:
    with pytest.raises(ApiError) as info:
        validate_create_batch(body, windows, PATHS)
    assert info.value.status == 400
    return info.value


def test_valid_request_is_returned_with_a_canonical_file_id() -> None:
    req = validate_create_batch(
        create(input_file_id=FILE_ID.upper(), metadata={"team": "x"}), WINDOWS, PATHS
    )
    assert req.input_file_id == FILE_ID
    assert req.endpoint == "/v1/chat/completions"
    assert req.completion_window == "24h"
    assert req.metadata == {"team": "x"}
    assert validate_create_batch(create(), WINDOWS, PATHS).metadata is None


def test_unsupported_window_lists_allowed_values() -> None:
    err = create_error(create(completion_window="7d"), windows=["24h"])
    assert err.message == "Unsupported completion_window. Allowed values: 24h"
    err = create_error(create(completion_window="7d"))
    assert err.message == "Unsupported completion_window. Allowed values: 24h, 1h"


def test_window_is_checked_before_endpoint() -> None:
    err = create_error(create(completion_window="7d", endpoint="/v1/nope"))
    assert err.message.startswith("Unsupported completion_window")


def test_unsupported_endpoint() -> None:
    err = create_error(create(endpoint="/v1/responses"))
    assert err.message == (
        "Unsupported endpoint '/v1/responses'. Supported: /v1/chat/completions, /v1/embeddings"
    )


def test_metadata_at_the_limits_is_accepted() -> None:
    metadata = {f"k{i:02d}": "v" for i in range(15)}
    metadata["k" * 64] = "v" * 512
    assert validate_create_batch(create(metadata=metadata), WINDOWS, PATHS).metadata == metadata


@pytest.mark.parametrize(
    "metadata",
    [
        {f"k{i}": "v" for i in range(17)},
        {"k" * 65: "v"},
        {"k": "v" * 513},
        {"k": 1},
        {"k": None},
        ["k", "v"],
        "k=v",
    ],
)
def test_metadata_out_of_bounds_is_400(metadata: Any) -> None:
    err = create_error(create(metadata=metadata))
    assert err.param == "metadata"
    assert "metadata" in err.message


def test_input_file_id_must_be_a_uuid() -> None:
    err = create_error(create(input_file_id="file-abc"))
    assert err.message == "Invalid input_file_id format"


def test_invalid_json_or_missing_fields_is_400() -> None:
    assert create_error(b"{not json").message.startswith("Invalid JSON body: ")
    assert "endpoint" in create_error(create(endpoint=...)).message
    assert "input_file_id" in create_error(create(input_file_id=7)).message


def test_lines_must_target_the_batch_endpoint() -> None:
    endpoint = "/v1/chat/completions"
    check_lines_match_endpoint({endpoint: 0}, endpoint)
    with pytest.raises(ApiError) as info:
        check_lines_match_endpoint({endpoint: 0, "/v1/x": 2, "/v1/embeddings": 1}, endpoint)
    assert info.value.status == 400
    assert info.value.message == (
        "Line 2: url '/v1/embeddings' does not match batch endpoint '/v1/chat/completions'"
    )


T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def ts(minutes: int) -> int:
    return int(at(minutes).timestamp())


def facts(**changes: Any) -> BatchFacts:
    base = BatchFacts(
        id="b1",
        endpoint="/v1/chat/completions",
        input_file_id=FILE_ID,
        completion_window="24h",
        output_file_id="o1",
        error_file_id="e1",
        metadata=None,
        created_at=T0,
        expires_at=T0 + timedelta(hours=24),
    )
    return msgspec.structs.replace(base, **changes)


def shown(f: BatchFacts) -> dict[str, Any]:
    """The batch object as its JSON reads."""
    return msgspec.to_builtins(batch_object(f))  # type: ignore[no-any-return]


def running(**changes: Any) -> BatchFacts:
    """A populated batch of 10 rows."""
    fields: dict[str, Any] = {"requests_started_at": at(1), "total": 10, "pending": 10}
    fields.update(changes)
    return facts(**fields)


def test_unpopulated_batch_is_validating_without_in_progress_at() -> None:
    f = facts(total=5)
    obj = shown(f)
    assert obj["status"] == "validating"
    assert obj["in_progress_at"] is None
    assert obj["request_counts"] == {"total": 0, "completed": 0, "failed": 0}


def test_population_failure_shows_failed_with_errors() -> None:
    obj = shown(facts(failed_at=at(2), errors_message="File was deleted"))
    assert obj["status"] == "failed"
    assert obj["failed_at"] == ts(2)
    assert obj["in_progress_at"] is None
    assert obj["errors"] == {
        "object": "list",
        "data": [
            {
                "code": "population_failed",
                "line": None,
                "message": "File was deleted",
                "param": None,
            }
        ],
    }


def test_running_batch_object_is_exact() -> None:
    f = running(pending=4, in_progress=2, completed=3, failed=1, metadata={"k": "v"})
    assert shown(f) == {
        "id": "b1",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "errors": None,
        "input_file_id": FILE_ID,
        "completion_window": "24h",
        "status": "in_progress",
        "output_file_id": "o1",
        "error_file_id": "e1",
        "created_at": ts(0),
        "in_progress_at": ts(1),
        "expires_at": ts(24 * 60),
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 10, "completed": 3, "failed": 1},
        "metadata": {"k": "v"},
    }


def test_unlinked_input_file_reads_as_empty_string() -> None:
    assert shown(running(input_file_id=None))["input_file_id"] == ""


def test_cancelling_until_every_row_is_terminal_then_cancelled() -> None:
    cancelling = running(
        cancelling_at=at(5), cancelled_at=at(5), pending=6, in_progress=1, completed=3
    )
    obj = shown(cancelling)
    assert obj["status"] == "cancelling"
    assert obj["cancelling_at"] == ts(5)
    assert obj["cancelled_at"] is None
    done = msgspec.structs.replace(cancelling, pending=0, in_progress=0, canceled=7)
    obj = shown(done)
    assert obj["status"] == "cancelled"
    assert obj["cancelled_at"] == ts(5)
    # Canceled rows count only in the total.
    assert obj["request_counts"] == {"total": 10, "completed": 3, "failed": 0}


def test_batch_cancelled_before_population_is_cancelled_with_total_zero() -> None:
    obj = shown(facts(cancelling_at=at(1), cancelled_at=at(1), total=4))
    assert obj["status"] == "cancelled"
    assert obj["request_counts"]["total"] == 0
    assert obj["in_progress_at"] is None


def test_expired_batch_shows_expired_at_only_then() -> None:
    f = running(pending=2, completed=8)
    assert shown(f)["expired_at"] is None
    obj = shown(msgspec.structs.replace(f, expired_at=at(24 * 60 + 1)))
    assert obj["status"] == "expired"
    assert obj["expired_at"] == ts(24 * 60 + 1)


def test_finished_with_every_row_failed_is_failed_even_before_stamping() -> None:
    assert derive_status(running(pending=0, failed=10)) == "failed"


def test_finished_without_a_stamp_is_finalizing_with_finalizing_at() -> None:
    obj = shown(running(pending=0, completed=9, failed=1, finalizing_at=at(30)))
    assert obj["status"] == "finalizing"
    assert obj["finalizing_at"] == ts(30)
    assert obj["completed_at"] is None


def test_completed_batch_shows_finalizing_and_completed_times() -> None:
    obj = shown(
        running(pending=0, completed=9, failed=1, finalizing_at=at(30), completed_at=at(30))
    )
    assert obj["status"] == "completed"
    assert (obj["finalizing_at"], obj["completed_at"]) == (ts(30), ts(30))
    assert obj["failed_at"] is None


def test_finished_with_failed_stamp_is_failed_and_hides_finalizing_at() -> None:
    obj = shown(running(pending=0, failed=4, canceled=6, finalizing_at=at(9), failed_at=at(9)))
    assert obj["status"] == "failed"
    assert obj["failed_at"] == ts(9)
    assert obj["finalizing_at"] is None


def test_rows_in_flight_keep_the_batch_in_progress() -> None:
    assert derive_status(running(pending=0, in_progress=1, completed=9)) == "in_progress"


def test_unknown_status_filter_lists_the_five_values() -> None:
    with pytest.raises(ApiError) as info:
        check_status_filter("validating")
    assert info.value.status == 400
    assert info.value.message == (
        "Invalid status filter 'validating'. Allowed values: in_progress, completed, failed, "
        "cancelled, expired"
    )


def test_error_envelope_and_type_mapping() -> None:
    assert not_found("Batch", "b1").envelope() == {
        "error": {
            "message": "Batch with ID b1 not found",
            "type": "invalid_request_error",
            "param": None,
            "code": "not_found",
        }
    }
    assert not_found("Batch", "b1").status == 404
    key = invalid_api_key()
    assert (key.status, key.message, key.code) == (401, "Invalid API key", "invalid_api_key")
    bad = invalid_request("nope", param="limit").envelope()["error"]
    assert (bad["code"], bad["param"]) == ("invalid_request", "limit")
    assert ApiError(429, "slow down").envelope()["error"]["type"] == "rate_limit_error"
    assert ApiError(503, "later").envelope()["error"]["type"] == "server_error"
    for status in (400, 403, 409, 413):
        assert ApiError(status, "x").type == "invalid_request_error"


def test_a_body_nested_too_deep_to_decode_is_invalid_json() -> None:
    deep = b'{"metadata":' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert create_error(deep).message.startswith("Invalid JSON body")
