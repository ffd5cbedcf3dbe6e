"""Pure rules around one upstream call: the post-claim body rewrites (core §4.3), outcome
classification (core §4.5) and the response id override (responses-and-api §8.8)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import msgspec

from streams.execution.failure import FailureReason, NonRetriableHttpStatus, RetriableHttpStatus

_ALWAYS_RETRIABLE = frozenset({429, 408, 404})
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_ID_OVERRIDE_PATHS = frozenset({"/v1/responses", "/v1/chat/completions"})


class RetryPolicy(msgspec.Struct, frozen=True):
    """Which HTTP statuses are worth another attempt."""

    # Later rule: 499 (client went away, e.g. an upstream proxy timing out) is transient.
    additional_retryable_statuses: tuple[int, ...] = (499,)

    def is_retriable(self, status: int) -> bool:
        if status >= 500 or status in _ALWAYS_RETRIABLE:
            return True
        # Extra codes only widen the error range; a 2xx listed by mistake must not loop.
        return status >= 400 and status in self.additional_retryable_statuses


DEFAULT_RETRY_POLICY = RetryPolicy()


class Success(msgspec.Struct, frozen=True):
    status: int
    body: str


class Failure(msgspec.Struct, frozen=True):
    reason: FailureReason


Outcome = Success | Failure


def classify(status: int, body: str, policy: RetryPolicy = DEFAULT_RETRY_POLICY) -> Outcome:
    if policy.is_retriable(status):
        return Failure(RetriableHttpStatus(status=status, body=body))
    if status >= 400:
        return Failure(NonRetriableHttpStatus(status=status, body=body))
    # Any status below 400 (1xx and 3xx included) is a completed request, as in the reference.
    return Success(status=status, body=body)


class ModelEscalation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    escalation_model: str
    threshold_s: float = 900.0


def escalate(
    model: str,
    body: bytes,
    deadline: datetime,
    now: datetime,
    escalations: Mapping[str, ModelEscalation],
) -> tuple[str, bytes]:
    """(model, body) to send: the escalation model once the deadline is closer than its threshold.

    The credential is unchanged; non-object bodies keep their bytes and only the routing model
    changes.
    """
    escalation = escalations.get(model)
    if escalation is None or (deadline - now).total_seconds() >= escalation.threshold_s:
        return model, body
    document = _json_object(body)
    if document is None:
        return escalation.escalation_model, body
    document["model"] = escalation.escalation_model
    return escalation.escalation_model, _encode(document).encode()


def inject_deadline_priority(body: bytes, deadline: datetime) -> bytes:
    """Set `nvext.agent_hints.priority = -(deadline in Unix seconds)` so earlier deadlines rank
    higher upstream; bodies where that path is not all objects are left byte-for-byte."""
    document = _json_object(body)
    if document is None:
        return body
    nvext = document.setdefault("nvext", {})
    if not isinstance(nvext, dict):
        return body
    hints = nvext.setdefault("agent_hints", {})
    if not isinstance(hints, dict):
        return body
    seconds = math.floor(deadline.timestamp())
    hints["priority"] = max(_INT32_MIN, min(_INT32_MAX, -seconds))
    return _encode(document).encode()


def override_response_id(body: str, request_id: str, path: str) -> str:
    """Give a top-level response the id callers can retrieve it by: `resp_<request uuid>`."""
    if path not in _ID_OVERRIDE_PATHS:
        return body
    document = _json_object(body)
    if document is None or "id" not in document:
        return body
    current = document["id"]
    if isinstance(current, str) and current.startswith("resp_"):
        return body
    document["id"] = f"resp_{request_id}"
    return _encode(document)


def _json_object(body: str | bytes) -> dict[str, Any] | None:
    try:
        document = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


def _encode(document: dict[str, Any]) -> str:
    # Compact, keys in their original order; anything msgspec decoded it can encode.
    return msgspec.json.encode(document).decode()
