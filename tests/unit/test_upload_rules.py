"""Upload validation as a caller of POST /v1/files sees it (responses-and-api §8.3)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cannonade.config import ModelKind
from projections.rules.upload import (
    ParsedLine,
    UploadLimits,
    parse_chunks,
    validate_expires_after,
    validate_purpose,
)
from schemas.errors import ApiError

KINDS: dict[str, ModelKind] = {"gpt": "chat", "emb": "embeddings"}
CHAT = "/v1/chat/completions"


def line(
    custom_id: Any = "a",
    *,
    url: str = CHAT,
    method: str = "POST",
    body: Any = None,
    model: str = "gpt",
) -> bytes:
    obj = {
        "custom_id": custom_id,
        "method": method,
        "url": url,
        "body": {"model": model, "messages": []} if body is None else body,
    }
    return msgspec.json.encode(obj)


class Parsed(msgspec.Struct):
    lines: list[ParsedLine]
    chunks: list[list[ParsedLine]]


def parse(data: bytes, chunk_bytes: int = 1 << 20, **limits: Any) -> Parsed:
    chunks = list(parse_chunks(data, UploadLimits(**limits), KINDS.get, chunk_bytes))
    return Parsed([line for chunk in chunks for line in chunk], chunks)


def rejected(data: bytes, **limits: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(data, **limits)
    return info.value


def test_accepts_lines_in_order_with_zero_based_numbers() -> None:
    data = line("a") + b"\n" + line("b", url="/v1/embeddings", model="emb") + b"\n"
    parsed = parse(data)
    assert [(p.line_number, p.custom_id, p.url, p.model) for p in parsed.lines] == [
        (0, "a", CHAT, "gpt"),
        (1, "b", "/v1/embeddings", "emb"),
    ]
    assert all(p.method == "POST" for p in parsed.lines)


def test_method_is_case_insensitive_and_stored_upper_case() -> None:
    assert parse(line(method="post")).lines[0].method == "POST"


def test_body_is_sanitised_compact_and_keeps_key_order() -> None:
    body = {
        "priority": 5,
        "model": "gpt",
        "service_tier": "flex",
        "messages": [{"role": "user", "content": "hi", "priority": 1}],
        "background": True,
        "temperature": 0.5,
    }
    raw = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": '
    raw += msgspec.json.encode(body).replace(b",", b", ") + b"}"
    parsed = parse(raw)
    assert parsed.lines[0].body == (
        b'{"model":"gpt","messages":[{"role":"user","content":"hi","priority":1}],"temperature":0.5}'
    )


def test_crlf_blank_and_whitespace_lines_do_not_count() -> None:
    data = b"\r\n   \r\n" + line("a") + b"\r\n\t\n\n" + line("b") + b"\r\n"
    parsed = parse(data)
    assert [p.line_number for p in parsed.lines] == [0, 1]
    err = rejected(b"\n  \n" + line("a") + b"\r\n\r\n\xc2\xa0\n{not json}")
    assert err.message.startswith("Invalid JSON on line 2: ")


def test_last_line_without_newline_counts() -> None:
    parsed = parse(line("a") + b"\n" + line("b"))
    assert [p.custom_id for p in parsed.lines] == ["a", "b"]


def test_file_over_the_size_limit_is_413() -> None:
    data = line("a")
    err = rejected(data, max_file_size=len(data) - 1)
    assert err.status == 413
    assert err.code == "file_too_large"
    assert err.message == f"File exceeds the maximum allowed size of {len(data) - 1} bytes"
    assert parse(data, max_file_size=len(data)).lines


def test_invalid_utf8_names_line_and_byte_offset() -> None:
    first = line("a") + b"\n\n"
    data = first + b'{"custom_id":"b\xff","method":"POST"}\n'
    offset = len(first) + len(b'{"custom_id":"b')
    err = rejected(data)
    assert err.status == 400
    assert err.message == (
        f"File contains invalid UTF-8 on/near line 2 at byte offset {offset}: "
        f"invalid utf-8 sequence of 1 bytes from index {offset}"
    )


def test_truncated_utf8_at_end_of_file() -> None:
    data = line("a") + b"\n\xe2\x82"
    err = rejected(data)
    assert err.message == (
        f"File contains invalid UTF-8 on/near line 2 at byte offset {len(data) - 2}: "
        f"incomplete utf-8 byte sequence from index {len(data) - 2}"
    )


def test_invalid_utf8_wins_over_an_earlier_bad_line() -> None:
    err = rejected(b"{oops}\n" + line("\xff") + b"\xff\n")
    assert err.message.startswith("File contains invalid UTF-8 on/near line 2")


def test_too_many_requests_names_the_first_excess_line() -> None:
    data = b"\n".join(line(c) for c in "abc")
    assert len(parse(data, max_requests_per_file=3).lines) == 3
    err = rejected(data + b"\n\n" + line("d"), max_requests_per_file=2)
    assert err.message == "File contains 3 requests, which exceeds the maximum of 2"


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        (b'{"method":"POST","url":"/v1/chat/completions","body":{}}', "custom_id"),
        (b'{"custom_id":"a","url":"/v1/chat/completions","body":{}}', "method"),
        (b'{"custom_id":"a","method":"POST","body":{}}', "url"),
        (b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions"}', "body"),
        (b'{"custom_id":7,"method":"POST","url":"/v1/chat/completions","body":{}}', "custom_id"),
    ],
)
def test_missing_or_mistyped_field_is_invalid_json_naming_it(raw: bytes, names: str) -> None:
    err = rejected(raw)
    assert err.status == 400
    assert err.message.startswith("Invalid JSON on line 1: ")
    assert names in err.message


@pytest.mark.parametrize("raw", [b"not json", b"[1,2]", b'"text"', b'{"custom_id":"a"} x'])
def test_unparseable_or_non_object_line_is_invalid_json(raw: bytes) -> None:
    assert rejected(raw).message.startswith("Invalid JSON on line 1: ")


def test_custom_id_length_is_counted_in_bytes() -> None:
    assert parse(line("x" * 64)).lines
    err = rejected(line("x" * 65))
    assert err.message == "Line 1: custom_id exceeds maximum length of 64 characters (got 65)"
    err = rejected(line("é" * 33))
    assert err.message == "Line 1: custom_id exceeds maximum length of 64 characters (got 66)"


@pytest.mark.parametrize("bad", ["a\x01b", "a\nb", "\x7f", "a\x1f"])
def test_custom_id_control_characters_are_rejected(bad: str) -> None:
    err = rejected(line(bad))
    assert err.status == 400
    assert err.message.startswith("Line 1: custom_id contains invalid characters: ")


def test_custom_id_may_hold_tab_and_non_ascii() -> None:
    assert [p.custom_id for p in parse(line("a\tb") + b"\n" + line("né")).lines] == [
        "a\tb",
        "né",
    ]


def test_duplicate_custom_id_names_the_first_line() -> None:
    data = line("a") + b"\n\n" + line("b") + b"\n" + line("a")
    err = rejected(data)
    assert err.status == 400
    assert err.code == "duplicate_custom_id"
    assert err.message == "Line 3: duplicate custom_id 'a' (first seen on line 1)"
    assert err.envelope()["error"]["code"] == "duplicate_custom_id"


def test_unsupported_method() -> None:
    err = rejected(line(method="GET"))
    assert err.message == "Line 1: Unsupported HTTP method 'GET'. Only POST is currently supported."


def test_unsupported_url_lists_allowed_paths() -> None:
    err = rejected(line(url="/v1/images"))
    assert err.message == (
        "Line 1: Unsupported URL path '/v1/images'. Allowed paths are: /v1/chat/completions, "
        "/v1/completions, /v1/embeddings, /v1/responses"
    )
    limited = rejected(line(url=CHAT), allowed_url_paths=("/v1/embeddings",))
    assert limited.message.endswith("Allowed paths are: /v1/embeddings")


@pytest.mark.parametrize("body", [{"messages": []}, {"model": 3}])
def test_missing_model(body: Any) -> None:
    err = rejected(line(body=body))
    assert err.status == 400
    assert err.message == "Line 1: Missing 'model' field in request body"


@pytest.mark.parametrize("body", ["null", '["gpt"]', '"gpt"', "7"])
def test_a_body_that_is_not_an_object_is_named_as_such(body: str) -> None:
    raw = b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":' + body.encode()
    err = rejected(raw + b"}")
    assert err.status == 400
    assert err.message == "Line 1: 'body' must be a JSON object"


def test_a_byte_order_mark_at_the_start_is_accepted() -> None:
    parsed = parse(b"\xef\xbb\xbf" + line("a") + b"\n" + line("b"))
    assert [p.custom_id for p in parsed.lines] == ["a", "b"]


def test_inaccessible_model_is_403() -> None:
    err = rejected(line("a") + b"\n" + line("b", model="secret"))
    assert err.status == 403
    assert err.code == "model_not_accessible"
    assert err.message == (
        "Line 2: Model 'secret' has not been configured or is not available to user"
    )
    assert err.envelope()["error"]["type"] == "invalid_request_error"


def test_a_model_allowed_on_one_endpoint_is_still_checked_on_another() -> None:
    data = line("a") + b"\n" + line("b") + b"\n" + line("c", url="/v1/embeddings")
    error = rejected(data)
    assert error.message.startswith("Line 3: Model 'gpt' is a CHAT model")


def test_a_custom_id_seen_before_is_refused_however_plain() -> None:
    error = rejected(line("a") + b"\n" + line("b") + b"\n" + line("a"))
    assert error.code == "duplicate_custom_id" and "first seen on line 1" in error.message


def test_model_type_must_match_endpoint() -> None:
    err = rejected(line(model="emb"))
    assert err.status == 400
    assert err.message == (
        "Line 1: Model 'emb' is a EMBEDDINGS model but endpoint '/v1/chat/completions' "
        "requires a CHAT model"
    )
    err = rejected(line(url="/v1/embeddings", model="gpt"))
    assert err.message == (
        "Line 1: Model 'gpt' is a CHAT model but endpoint '/v1/embeddings' "
        "requires a EMBEDDINGS model"
    )
    for url in ("/v1/completions", "/v1/responses"):
        assert rejected(line(url=url, model="emb")).message.endswith("requires a CHAT model")


def test_body_size_is_measured_after_sanitising() -> None:
    body = {"model": "gpt", "input": "x" * 20, "priority": 1, "service_tier": "flex"}
    kept = len(b'{"model":"gpt","input":"' + b"x" * 20 + b'"}')
    assert parse(line(body=body), max_request_body_size=kept).lines[0].body.endswith(b'x"}')
    err = rejected(line(body=body), max_request_body_size=kept - 1)
    assert err.message == (
        f"Line 1: Request body is {kept} bytes, which exceeds the maximum allowed size of "
        f"{kept - 1} bytes"
    )


@pytest.mark.parametrize("data", [b"", b"\n\n", b"  \r\n\t\n"])
def test_file_without_requests_is_rejected(data: bytes) -> None:
    err = rejected(data)
    assert err.status == 400
    assert err.message == "File contains no valid request templates"


def test_first_failure_wins() -> None:
    err = rejected(line(url="/nope") + b"\n{bad json")
    assert err.message.startswith("Line 1: Unsupported URL path '/nope'")
    # Within one line the rule order holds: custom_id before method before url.
    err = rejected(line("x" * 65, method="GET", url="/nope"))
    assert "custom_id exceeds" in err.message


def test_purpose_defaults_to_batch_and_rejects_others() -> None:
    assert validate_purpose(None) == "batch"
    assert validate_purpose("batch") == "batch"
    with pytest.raises(ApiError) as info:
        validate_purpose("fine-tune")
    assert info.value.status == 400
    assert info.value.message == "Invalid purpose 'fine-tune'. Only 'batch' is supported."


NOW = datetime(2025, 1, 1, tzinfo=UTC)


def test_expires_after_defaults_to_thirty_days() -> None:
    assert validate_expires_after(None, None, NOW) == NOW + timedelta(days=30)
    assert validate_expires_after("created_at", None, NOW) == NOW + timedelta(days=30)


@pytest.mark.parametrize("seconds", [3600, "3600", 2_592_000, "86400"])
def test_expires_after_within_bounds(seconds: int | str) -> None:
    assert validate_expires_after("created_at", seconds, NOW) == NOW + timedelta(
        seconds=int(seconds)
    )


@pytest.mark.parametrize(
    ("anchor", "seconds"),
    [("last_active_at", 3600), ("created_at", 3599), ("created_at", 2_592_001), (None, "soon")],
)
def test_expires_after_out_of_bounds_is_400(anchor: str | None, seconds: int | str) -> None:
    with pytest.raises(ApiError) as info:
        validate_expires_after(anchor, seconds, NOW)
    assert info.value.status == 400


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def _uploads(draw: st.DrawFn) -> bytes:
    """Files whose lines are valid, almost valid, or anything at all."""
    lines: list[bytes] = []
    for n in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["valid", "mutated", "bytes"]))
        if kind == "bytes":
            lines.append(draw(st.binary(max_size=40)))
            continue
        doc: dict[str, Any] = msgspec.json.decode(line(f"c{n}"))
        if kind == "mutated":
            doc[draw(st.sampled_from(["custom_id", "method", "url", "body", "extra"]))] = draw(_json_values)  # fmt: skip
        lines.append(msgspec.json.encode(doc))
    return draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + b"\n".join(lines)


@settings(max_examples=300, deadline=None)
@given(data=_uploads())
def test_any_upload_is_parsed_or_rejected_with_a_client_error(data: bytes) -> None:
    try:
        parsed = parse(data)
    except ApiError as exc:
        assert 400 <= exc.status < 500 and exc.message
        return
    for accepted in parsed.lines:
        assert msgspec.json.decode(accepted.body)["model"] == accepted.model
        assert (
            set(msgspec.json.decode(accepted.body)) & {"priority", "service_tier", "background"}
            == set()
        )


def test_lines_come_in_chunks_of_about_the_body_size_asked_a_larger_line_alone() -> None:
    small = [line(f"s{i}") for i in range(5)]
    big = line("big", body={"model": "gpt", "messages": "x" * 300})
    parsed = parse(b"\n".join([*small[:3], big, *small[3:]]), chunk_bytes=120)
    sizes = [[len(p.body) for p in chunk] for chunk in parsed.chunks]
    assert [p.custom_id for p in parsed.lines] == ["s0", "s1", "s2", "big", "s3", "s4"]
    assert all(sum(chunk) <= 120 or len(chunk) == 1 for chunk in sizes), sizes
    assert [len(chunk) for chunk in sizes] == [3, 1, 2]


def test_a_late_bad_line_fails_the_upload_after_its_first_chunks_were_given() -> None:
    chunks = parse_chunks(
        b"\n".join([line("a"), line("b"), line("c", url="/v1/nowhere")]),
        UploadLimits(),
        KINDS.get,
        1,
    )
    assert [p.custom_id for p in next(chunks)] == ["a"]
    with pytest.raises(ApiError, match="Line 3: Unsupported URL path"):
        list(chunks)
