"""Validation and parsing of an uploaded batch input file (responses-and-api §8.3 rules 2–9).

Lines come out a chunk at a time as they pass, and the file is created only once every line
has (a rejected file's parts are voided, :mod:`projections.api.upload_parts`); the first
failure wins and its message names the offending line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import msgspec

from cannonade.config import ModelKind
from schemas.errors import ApiError
from schemas.types import CONTROL

DEFAULT_EXPIRES_AFTER = 30 * 24 * 3600
_MIN_EXPIRES_AFTER = 3600
_MAX_EXPIRES_AFTER = 2_592_000
_MAX_CUSTOM_ID_BYTES = 64

# Fields a caller must not control, dropped from every body (§8.3 rule 8j, core §1.2).
_DROPPED_KEYS = ("priority", "service_tier", "background")

# Endpoints whose model type is checked; other configured paths accept either type.
_REQUIRED_KIND: dict[str, ModelKind] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "chat",
    "/v1/responses": "chat",
    "/v1/embeddings": "embeddings",
}

# Control bytes a custom_id may not hold: it travels as an HTTP header value.
_CONTROL = re.compile(f"[{CONTROL}]")  # the custom_id rule of the commands contract

# Rust's `str::trim` set, which the reference used to decide that a line is blank.
_UNICODE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


class UploadLimits(msgspec.Struct, frozen=True):
    max_file_size: int = 209_715_200
    max_requests_per_file: int = 50_000
    max_request_body_size: int = 10_485_760
    allowed_url_paths: tuple[str, ...] = (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
    )


class ParsedLine(msgspec.Struct, frozen=True, gc=False):
    line_number: int  # 0-based among accepted lines
    custom_id: str
    method: str
    url: str
    body: bytes  # sanitised, compact JSON
    model: str


class _InputLine(msgspec.Struct):
    custom_id: str
    method: str
    url: str
    body: Any


_decode_line = msgspec.json.Decoder(_InputLine).decode
_encode = msgspec.json.Encoder().encode


def _bad_file(message: str) -> ApiError:
    return ApiError(400, message, code="invalid_file")


def validate_purpose(purpose: str | None) -> str:
    if purpose is None or purpose == "batch":
        return "batch"
    raise ApiError(
        400,
        f"Invalid purpose '{purpose}'. Only 'batch' is supported.",
        code="invalid_request",
        param="purpose",
    )


def validate_expires_after(
    anchor: str | None, seconds: int | str | None, now: datetime
) -> datetime:
    if anchor is not None and anchor != "created_at":
        raise ApiError(
            400,
            f"Invalid expires_after[anchor] '{anchor}'. Only 'created_at' is supported.",
            code="invalid_request",
            param="expires_after[anchor]",
        )
    if seconds is None:
        return now + timedelta(seconds=DEFAULT_EXPIRES_AFTER)
    value = _integer(seconds)
    if value is None or not _MIN_EXPIRES_AFTER <= value <= _MAX_EXPIRES_AFTER:
        raise ApiError(
            400,
            f"Invalid expires_after[seconds] '{seconds}'. It must be an integer between "
            f"{_MIN_EXPIRES_AFTER} and {_MAX_EXPIRES_AFTER}.",
            code="invalid_request",
            param="expires_after[seconds]",
        )
    return now + timedelta(seconds=value)


def _integer(value: int | str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def _trim(raw: bytes) -> bytes:
    text = raw.strip()
    # Only a line that starts or ends with a non-ASCII byte can hold Unicode padding.
    if text and (text[0] >= 0x80 or text[-1] >= 0x80):
        text = text.decode().strip(_UNICODE_SPACE).encode()
    return text


def _plain(custom_id: str) -> bool:
    """Short printable ASCII, as nearly every custom_id is: no rule of the id can refuse it, so
    the per-line checks skip the rules for it."""
    return (
        custom_id.isascii() and custom_id.isprintable() and len(custom_id) <= _MAX_CUSTOM_ID_BYTES
    )


def _check_utf8(data: bytes) -> None:
    if data.isascii():
        return
    try:
        data.decode()
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = 1 + sum(1 for raw in data[:line_start].split(b"\n") if _trim(raw))
        # Worded as Rust's Utf8Error, which the reference reported.
        if exc.reason == "unexpected end of data":
            detail = f"incomplete utf-8 byte sequence from index {exc.start}"
        else:
            detail = f"invalid utf-8 sequence of {exc.end - exc.start} bytes from index {exc.start}"
        raise _bad_file(
            f"File contains invalid UTF-8 on/near line {line} at byte offset {exc.start}: {detail}"
        ) from None


class _LineChecker:
    """Per-upload state for the line rules: custom_ids seen and model kinds looked up."""

    def __init__(self, limits: UploadLimits, model_kind: Callable[[str], ModelKind | None]):
        self.limits = limits
        self.allowed = frozenset(limits.allowed_url_paths)
        self.model_kind = model_kind
        self.kinds: dict[str, ModelKind | None] = {}
        self.first_seen: dict[str, int] = {}
        self.passed: set[tuple[str, str]] = set()  # (model, url) pairs the rules allowed

    def parse(self, n: int, text: bytes) -> ParsedLine:
        try:
            line = _decode_line(text)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise _bad_file(f"Invalid JSON on line {n}: {exc}") from None
        custom_id = line.custom_id
        if custom_id in self.first_seen or not _plain(custom_id):
            self._check_custom_id(n, custom_id)
        self.first_seen[custom_id] = n
        if line.method != "POST" and line.method.upper() != "POST":
            raise _bad_file(
                f"Line {n}: Unsupported HTTP method '{line.method}'. "
                "Only POST is currently supported."
            )
        url = line.url
        if url not in self.allowed:
            raise _bad_file(
                f"Line {n}: Unsupported URL path '{url}'. Allowed paths are: "
                + ", ".join(self.limits.allowed_url_paths)
            )
        body = line.body
        if not isinstance(body, dict):
            raise _bad_file(f"Line {n}: 'body' must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise _bad_file(f"Line {n}: Missing 'model' field in request body")
        if (model, url) not in self.passed:  # checked once per pair, not per line
            self._check_model(n, model, url)
            self.passed.add((model, url))
        for key in _DROPPED_KEYS:
            body.pop(key, None)
        encoded = _encode(body)
        if len(encoded) > self.limits.max_request_body_size:
            raise _bad_file(
                f"Line {n}: Request body is {len(encoded)} bytes, which exceeds the maximum "
                f"allowed size of {self.limits.max_request_body_size} bytes"
            )
        return ParsedLine(n - 1, custom_id, "POST", url, encoded, model)

    def _check_custom_id(self, n: int, custom_id: str) -> None:
        size = len(custom_id) if custom_id.isascii() else len(custom_id.encode())
        if size > _MAX_CUSTOM_ID_BYTES:
            raise _bad_file(
                f"Line {n}: custom_id exceeds maximum length of {_MAX_CUSTOM_ID_BYTES} "
                f"characters (got {size})"
            )
        if _CONTROL.search(custom_id):
            raise _bad_file(
                f"Line {n}: custom_id contains invalid characters: "
                "control characters are not allowed"
            )
        first = self.first_seen.get(custom_id)
        if first is not None:
            raise ApiError(
                400,
                f"Line {n}: duplicate custom_id '{custom_id}' (first seen on line {first})",
                code="duplicate_custom_id",
            )

    def _check_model(self, n: int, model: str, url: str) -> None:
        if model in self.kinds:
            kind = self.kinds[model]
        else:
            kind = self.kinds[model] = self.model_kind(model)
        if kind is None:
            raise ApiError(
                403,
                f"Line {n}: Model '{model}' has not been configured or is not available to user",
                code="model_not_accessible",
            )
        needed = _REQUIRED_KIND.get(url)
        if needed is not None and kind != needed:
            raise _bad_file(
                f"Line {n}: Model '{model}' is a {kind.upper()} model but endpoint '{url}' "
                f"requires a {needed.upper()} model"
            )


def parse_chunks(
    data: bytes,
    limits: UploadLimits,
    model_kind: Callable[[str], ModelKind | None],
    chunk_bytes: int,
) -> Iterator[list[ParsedLine]]:
    """Accepted lines of an upload in order, in chunks of about ``chunk_bytes`` of bodies (a
    larger line alone), as they are parsed; raises the ApiError of the first failure when it
    is reached, so a caller may start on the first chunks but must not commit to them before
    the last.

    `model_kind` answers the kind of a model the uploader may use, None when it may not.
    """
    if len(data) > limits.max_file_size:
        raise ApiError(
            413,
            f"File exceeds the maximum allowed size of {limits.max_file_size} bytes",
            code="file_too_large",
        )
    # A byte order mark is no content (OpenAI accepts files that start with one).
    data = data.removeprefix(b"\xef\xbb\xbf")
    _check_utf8(data)
    checker = _LineChecker(limits, model_kind)
    chunk: list[ParsedLine] = []
    size = 0
    n = 0
    # Splitting on \n and trimming also accepts \r\n endings and a last line without newline.
    for raw in data.split(b"\n"):
        text = _trim(raw)
        if not text:
            continue
        n += 1
        if n > limits.max_requests_per_file:
            raise _bad_file(
                f"File contains {n} requests, which exceeds the maximum of "
                f"{limits.max_requests_per_file}"
            )
        line = checker.parse(n, text)
        if chunk and size + len(line.body) > chunk_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(line)
        size += len(line.body)
    if not chunk:
        raise _bad_file("File contains no valid request templates")
    yield chunk
