"""Download lines and file objects, byte for byte (core §1.3.4, §2.10; §8.3, §8.5)."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from projections.rules.content import (
    error_line,
    file_bytes,
    file_object,
    input_line,
    output_line,
    virtual_file_names,
)

RID = "0e6c1f2a-5b3d-4c7e-9f10-112233445566"


def test_output_line_embeds_the_body_as_json() -> None:
    assert output_line(RID, "req-1", 200, '{"id": "x",\n "n": [1, 2]}') == (
        b'{"id":"batch_req_' + RID.encode() + b'","custom_id":"req-1",'
        b'"response":{"status_code":200,"request_id":null,"body":{"id":"x","n":[1,2]}},'
        b'"error":null}\n'
    )


def test_output_line_keeps_unparseable_body_as_string_and_defaults() -> None:
    line = output_line(RID, None, None, "upstream said\nno")
    assert line == (
        b'{"id":"batch_req_' + RID.encode() + b'","custom_id":null,'
        b'"response":{"status_code":200,"request_id":null,"body":"upstream said\\nno"},'
        b'"error":null}\n'
    )
    assert b'"body":null' in output_line(RID, "a", 201, None)
    assert b'"status_code":201' in output_line(RID, "a", 201, None)
    assert line.count(b"\n") == 1


def test_error_line_keeps_the_error_text_as_a_string() -> None:
    error = '{"type":"NonRetriableHttpStatus","details":{"status":400,"body":"bad"}}'
    assert error_line(RID, "req-2", error) == (
        b'{"id":"batch_req_' + RID.encode() + b'","custom_id":"req-2","response":null,'
        b'"error":{"code":null,"message":"{\\"type\\":\\"NonRetriableHttpStatus\\",'
        b'\\"details\\":{\\"status\\":400,\\"body\\":\\"bad\\"}}"}}\n'
    )


def test_error_line_without_error_says_unknown_error() -> None:
    assert error_line(RID, "c", None).endswith(
        b'"error":{"code":null,"message":"Unknown error"}}\n'
    )


def test_input_line_is_the_openai_request_shape() -> None:
    assert (
        input_line("a", "POST", "/v1/embeddings", '{"model":"m","input":"é"}'.encode())
        == (
            '{"custom_id":"a","method":"POST","url":"/v1/embeddings",'
            '"body":{"model":"m","input":"é"}}\n'
        ).encode()
    )


def test_a_file_reports_its_upload_size_or_its_batchs_estimate() -> None:
    counts = {"completed": 3, "response_bytes": 1000, "failed": 2, "error_bytes": 500}
    # The reference's estimate: the bodies plus a fixed envelope per line.
    assert file_bytes("batch_output", None, **counts) == 1000 + 3 * 181
    assert file_bytes("batch_error", None, **counts) == 500 + 2 * 160
    assert file_bytes("batch", 4242, **counts) == 4242
    # A batch with no line of a kind yet has an empty file of that kind.
    nothing = dict(counts, completed=0, failed=0)
    assert file_bytes("batch_output", None, **nothing) == 0
    assert file_bytes("batch_error", None, **nothing) == 0


def test_virtual_file_names() -> None:
    assert virtual_file_names("b1") == ("batch-b1-output.jsonl", "batch-b1-error.jsonl")


def test_file_object_uses_unix_seconds() -> None:
    created = datetime(2025, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
    expires = datetime(2025, 2, 1, 3, 4, 5, tzinfo=UTC)
    assert msgspec.to_builtins(
        file_object(
            file_id="f1",
            bytes_=42,
            created_at=created,
            filename="in.jsonl",
            purpose="batch",
            expires_at=expires,
        )
    ) == {
        "id": "f1",
        "object": "file",
        "bytes": 42,
        "created_at": 1735787045,
        "filename": "in.jsonl",
        "purpose": "batch",
        "status": "processed",
        "expires_at": 1738379045,
    }


def test_virtual_file_object_has_no_expiry_and_naive_times_are_utc() -> None:
    obj = file_object(
        file_id="o1",
        bytes_=0,
        created_at=datetime(2025, 1, 2, 3, 4, 5),
        filename="batch-b1-output.jsonl",
        purpose="batch_output",
        expires_at=None,
    )
    assert obj.created_at == 1735787045
    assert obj.expires_at is None
