"""Why a request failed: the FailureReason variants and their stored envelope (core §1.4.3).

The `error` column holds `{"type": <variant>, "details": {...}}` (data-less variants omit
`details`), byte-compatible with the reference's serde adjacent tagging so stored rows and
downloaded error lines read the same in both systems.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, cast

import msgspec

# The reference stores statuses as u16; anything else in a stored envelope is not ours.
_Status = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class _Reason(msgspec.Struct, frozen=True):
    retriable: ClassVar[bool]

    def to_json(self) -> str:
        envelope: dict[str, Any] = {"type": type(self).__name__}
        details = msgspec.structs.asdict(self)
        if details:
            envelope["details"] = details
        return msgspec.json.encode(envelope).decode()


class RetriableHttpStatus(_Reason, frozen=True):
    retriable = True
    status: _Status
    body: str


class NonRetriableHttpStatus(_Reason, frozen=True):
    retriable = False
    status: _Status
    body: str


class NetworkError(_Reason, frozen=True):
    """`error` is itself JSON `{"message", "sources"}` when Cannonade wrote it."""

    retriable = True
    error: str

    @classmethod
    def of(cls, message: str, sources: Sequence[str] = ()) -> NetworkError:
        described = {"message": message, "sources": list(sources)}
        return cls(error=msgspec.json.encode(described).decode())


class Timeout(_Reason, frozen=True):
    retriable = True
    error: str


class TaskTerminated(_Reason, frozen=True):
    retriable = True


class RequestBuilderError(_Reason, frozen=True):
    retriable = False
    error: str


class BatchTerminated(_Reason, frozen=True):
    retriable = False


FailureReason = (
    RetriableHttpStatus
    | NonRetriableHttpStatus
    | NetworkError
    | Timeout
    | TaskTerminated
    | RequestBuilderError
    | BatchTerminated
)

_VARIANTS: dict[str, type[_Reason]] = {
    variant.__name__: variant
    for variant in (
        RetriableHttpStatus,
        NonRetriableHttpStatus,
        NetworkError,
        Timeout,
        TaskTerminated,
        RequestBuilderError,
        BatchTerminated,
    )
}


def parse(text: str) -> FailureReason:
    """Read a stored `error` value; anything that is not an envelope is a NetworkError."""
    try:
        envelope = msgspec.json.decode(text)
        variant = _VARIANTS[envelope["type"]]
        fields = msgspec.structs.fields(variant)
        details = envelope.get("details") if fields else {}
        return cast(FailureReason, msgspec.convert(details, variant))
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, KeyError, TypeError, AttributeError):  # fmt: skip
        return NetworkError(error=text)
