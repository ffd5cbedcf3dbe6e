"""Retrieval of responses (responses-and-api §4): what `GET /v1/responses/{id}` and the flex
chat-completions handler answer for a request row.

With the project's decisions: Responses objects carry Responses-style usage, and a failure
payload `{"type","message"}` (a failed chain's step or loop error) is unwrapped into
`error.type`/`error.message` instead of surfacing as raw JSON text (Q3, Q4). Objects also
carry `tools`, `tool_choice` and `parallel_tool_calls` from the stored body, which the
`openai` SDK's Response type requires.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import msgspec

from projections.rules.content import unix_seconds
from schemas.api import ErrorBody, ErrorEnvelope
from streams.responses.steps import Step, response_id
from streams.responses.translate import is_int, responses_usage, tool_fields

_UPSTREAM_RETURNED = re.compile(r"Upstream returned (\d+): (.*)", re.DOTALL)
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_credits",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    499: "client_disconnected",
}
# A stored Responses object that did not simply complete: cut short by the token limit,
# stopped by a content filter, or waiting on the caller's own tools.
_ENDED_SHORT = ("incomplete", "failed", "requires_action")
_STATUSES = {
    "pending": "queued",
    "claimed": "in_progress",
    "processing": "in_progress",
    "completed": "completed",
    "failed": "failed",
    "canceled": "cancelled",
}


class RequestDetail(msgspec.Struct, frozen=True, kw_only=True):
    """A batchless request row with its bodies, as retrieval loads it."""

    id: str
    state: str
    model: str
    created_at: datetime
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    response_status: int | None = None
    response_body: str | None = None
    error: str | None = None
    body: str | None = None  # the stored request body


class ParsedError(msgspec.Struct, frozen=True):
    type: str
    message: str
    status: int | None = None


# --- lookup (§4.1) ---------------------------------------------------------------------------


def backing_request_id(response_uuid: str, step: Step | None) -> str | None:
    """Which request row answers for `response_uuid` (parsed, §0); None → 404.

    `step` is the step whose id is `response_uuid`, if any: a head answers through its
    request row, any other step is not a response. Without a step the id is a row's own.
    """
    if step is None:
        return response_uuid
    if not step.is_head:
        return None
    return step.request_id


# --- statuses and errors (§4.2, §4.4, §4.5) --------------------------------------------------


def state_to_status(state: str) -> str:
    return _STATUSES.get(state, "failed")


def status_error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "server_error")


def status_error_code(status: int) -> str:
    """A failed Responses object's `error.code` for an HTTP status: one the `openai` SDK's
    `ResponseError` names (a string, never the status)."""
    return "rate_limit_exceeded" if status == 429 else "server_error"


def _decode(text: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return None


def openai_message(text: str) -> str | None:
    """The `error.message` of an OpenAI error envelope, if `text` is one."""
    document = _decode(text)
    error = document.get("error") if isinstance(document, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) else None


def openai_envelope(text: str, status: int) -> ErrorEnvelope | None:
    """`text` as the complete OpenAI envelope, if it is one (it has `error.message`): its
    type, param and code kept when they have the envelope's types, filled in otherwise."""
    document = _decode(text)
    error = document.get("error") if isinstance(document, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(error, dict) or not isinstance(message, str):
        return None
    kind, param, code = error.get("type"), error.get("param"), error.get("code")
    return ErrorEnvelope(
        ErrorBody(
            message=message,
            type=kind if isinstance(kind, str) else status_error_type(status),
            param=param if isinstance(param, str) else None,
            code=code if isinstance(code, str) or is_int(code) else None,
        )
    )


def _failure_payload(text: str) -> tuple[str, str] | None:
    """(type, message) of a `{"type","message"}` failure payload, if `text` is one."""
    document = _decode(text)
    if not isinstance(document, dict):
        return None
    kind, message = document.get("type"), document.get("message")
    if isinstance(kind, str) and isinstance(message, str):
        return kind, message
    return None


def _explain(text: str, status: int | None, fallback_type: str) -> ParsedError:
    message = openai_message(text)
    if message is not None:
        return ParsedError(fallback_type, message, status)
    payload = _failure_payload(text)
    if payload is not None:
        return ParsedError(payload[0], payload[1], status)
    return ParsedError(fallback_type, text, status)


def parse_error_column(text: str) -> ParsedError:
    """§4.4, first match: FailureReason envelope with a body, `Upstream returned`, a bare
    envelope, raw text."""
    document = _decode(text)
    details = document.get("details") if isinstance(document, dict) else None
    if isinstance(details, dict) and isinstance(details.get("body"), str):
        body, status = details["body"], details.get("status")
        known = status if is_int(status) and 0 <= status <= 65535 else None
        return _explain(body, known, status_error_type(500 if known is None else known))
    matched = _UPSTREAM_RETURNED.fullmatch(text)
    if matched is not None and int(matched[1]) <= 65535:
        status = int(matched[1])
        return _explain(matched[2], status, status_error_type(status))
    return _explain(text, None, "server_error")


def _upstream_error_message(code: int, body: str | None) -> str:
    if body is None:
        return f"Upstream returned {code}"
    message = openai_message(body)
    return body if message is None else message


# --- the Responses object (§4.3) -------------------------------------------------------------


def _stored_request(detail: RequestDetail) -> dict[str, Any]:
    document = _decode(detail.body) if detail.body is not None else None
    return document if isinstance(document, dict) else {}


def _timestamp(at: datetime | None) -> int | None:
    return None if at is None else unix_seconds(at)


def response_object(detail: RequestDetail, *, head_id: str | None = None) -> dict[str, Any]:
    """The Responses object for a row; `head_id` forces the id on the step path (§4.1.5)."""
    request = _stored_request(detail)
    status = state_to_status(detail.state)
    background = request.get("background")
    response: dict[str, Any] = {
        "id": response_id(head_id if head_id is not None else detail.id),
        "object": "response",
        "created_at": unix_seconds(detail.created_at),
        "status": status,
        "model": detail.model,
        "background": background if isinstance(background, bool) else False,
        "output": [],
        **tool_fields(request),
    }
    if status == "completed":
        _apply_completion(response, detail)
    elif status == "failed" and detail.error is not None:
        parsed = parse_error_column(detail.error)
        error: dict[str, Any] = {"type": parsed.type, "message": parsed.message}
        if parsed.status is not None:
            error["code"] = parsed.status
        response["error"] = error
    return response


def _apply_completion(response: dict[str, Any], detail: RequestDetail) -> None:
    code = 200 if detail.response_status is None else detail.response_status
    if code >= 400:
        # The upstream's error answer was stored as the result; callers must see a failure.
        response["status"] = "failed"
        response["error"] = {
            "type": status_error_type(code),
            "code": code,
            "message": _upstream_error_message(code, detail.response_body),
        }
    else:
        body = _decode(detail.response_body) if detail.response_body is not None else None
        if isinstance(body, dict):
            created_as = body.get("status")
            if created_as in _ENDED_SHORT:
                # Retrieval says what creation did (§7.8's status from the finish reason).
                response["status"] = created_as
            if created_as == "incomplete":
                response["incomplete_details"] = body.get("incomplete_details")
            if "output" in body:
                response["output"] = body["output"]
            if "usage" in body:
                response["usage"] = responses_usage(body["usage"])
            if "choices" in body:
                # A chat completion (flex or batch row) travels whole inside one message.
                response["output"] = [{"type": "message", "role": "assistant", "content": body}]
    response["completed_at"] = _timestamp(detail.completed_at)


# --- flex chat completions (§4.6) ------------------------------------------------------------


def _error_body(message: str, type: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def chat_completion_result(detail: RequestDetail) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) answering a flex chat completion from its terminal row."""
    if detail.state == "completed":
        code = 200 if detail.response_status is None else detail.response_status
        if code >= 400:
            message = _upstream_error_message(code, detail.response_body)
            return code, _error_body(message, status_error_type(code), code)
        try:
            return code, msgspec.json.decode(detail.response_body or "")
        except (msgspec.DecodeError, RecursionError):
            return 500, _error_body("Empty or invalid response from upstream", "server_error", 500)
    if detail.state == "failed":
        if detail.error is None:
            return 500, _error_body("Request failed", "server_error", 500)
        parsed = parse_error_column(detail.error)
        code = 500 if parsed.status is None else parsed.status
        return code, _error_body(parsed.message, parsed.type, code)
    if detail.state == "canceled":
        return 499, _error_body("Request was canceled", "request_canceled", 499)
    return 500, _error_body(f"Unexpected request state: {detail.state}", "server_error", 500)
