"""The OpenAI error envelope every Cannonade-generated error uses (responses-and-api §8.2).

A rule anywhere (the API, the commands agent) raises :class:`ApiError`; the API answers it as
the envelope, the commands agent records it as a rejection with the same status and message.
"""

from __future__ import annotations

from typing import Any


def error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


class ApiError(Exception):
    """An HTTP error answer; raising it anywhere on the read path ends the request with it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | int | None = None,
        param: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type if type is not None else error_type(status)

    def envelope(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def not_found(kind: str, id: str) -> ApiError:
    """`kind` is `File`, `Batch` or `response`, as the messages read."""
    return ApiError(404, f"{kind} with ID {id} not found", code="not_found")


def invalid_request(
    message: str, code: str = "invalid_request", param: str | None = None
) -> ApiError:
    return ApiError(400, message, code=code, param=param)


def input_file_deleted(batch_id: str) -> ApiError:
    """A retry of a batch whose input file was deleted: its lines are gone (core §3.1)."""
    return ApiError(
        400,
        f"The input file of batch {batch_id} was deleted; its requests cannot run again",
        code="invalid_request",
    )


def invalid_api_key(given: bool = True) -> ApiError:
    """401 for a key that is unknown or revoked, or for none at all (``given`` False)."""
    message = "Invalid API key" if given else "API key required"
    return ApiError(401, message, code="invalid_api_key")
