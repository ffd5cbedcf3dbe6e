"""A small synchronous client of Cannonade's HTTP API, for the user CLI: it needs only the
API's address and a key, so it works against any deployment.

Responses are read into tolerant structs holding what the CLI shows (unknown fields are
ignored), so a client keeps working against a newer server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgspec

from cannonade import __version__

T = TypeVar("T")
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


class ClientError(Exception):
    """An error answer (the OpenAI envelope's message) or an unreachable API."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def transient(self) -> bool:
        """Worth retrying: the API was unreachable, overloaded or waiting on its projection."""
        return self.status is None or self.status == 429 or self.status >= 500


class Counts(msgspec.Struct):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(msgspec.Struct):
    message: str
    line: int | None = None


class BatchErrors(msgspec.Struct):
    data: list[BatchError] = []


class Batch(msgspec.Struct):
    id: str
    status: str
    endpoint: str
    completion_window: str
    created_at: int
    request_counts: Counts = msgspec.field(default_factory=Counts)
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: BatchErrors | None = None
    metadata: dict[str, str] | None = None

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL


class Key(msgspec.Struct):
    id: str
    created_at: int
    revoked_at: int | None = None
    current: bool = False


class _Created(msgspec.Struct):
    id: str


class _Page(msgspec.Struct):
    data: list[Any]
    has_more: bool = False


def base_url(api_url: str) -> str:
    """The API's root, whether given with ``/v1`` (as OpenAI clients take it) or without."""
    url = api_url.rstrip("/")
    return url.removesuffix("/v1")


class Client:
    # Above the API's own wait for its writes to show (`api.projection_wait_s`, 300 s): a
    # create or cancel may take that long before it answers.
    def __init__(self, api_url: str, api_key: str, timeout_s: float = 330.0) -> None:
        if not (api_key.isascii() and api_key.isprintable()):
            raise ClientError("the API key holds a character a header cannot carry (pasted a space?)")  # fmt: skip
        self._timeout_s = timeout_s
        self._http = httpx.Client(
            base_url=base_url(api_url) + "/v1",
            headers={
                "Authorization": f"Bearer {api_key}",
                "User-Agent": f"cannonade-cli/{__version__}",
            },
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            transport=httpx.HTTPTransport(retries=2),  # connection attempts only
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ReadTimeout:
            raise ClientError(
                f"the API did not answer within {self._timeout_s:.0f} s; what was asked may have"
                " been done: look before asking again"
            ) from None
        except httpx.TransportError as exc:
            raise ClientError(f"cannot reach the API at {self._http.base_url}: {exc}") from None
        _check(response)
        return response

    def upload(self, path: Path) -> str:
        """Upload a JSONL file for batches; returns the file id. The idempotency key makes a
        retried upload name the same file."""
        with path.open("rb") as fh:
            response = self._request(
                "POST", "/files",
                data={"purpose": "batch"},
                files={"file": (path.name, fh, "application/jsonl")},
                headers={"Idempotency-Key": str(uuid.uuid4())},
                timeout=httpx.Timeout(None, connect=10.0),  # a large file takes what it takes
            )  # fmt: skip
        return _decode(response, _Created).id

    def create_batch(
        self, file_id: str, endpoint: str, window: str, metadata: dict[str, str] | None
    ) -> Batch:
        body: dict[str, Any] = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": window}  # fmt: skip
        if metadata:
            body["metadata"] = metadata
        return _decode(self._request("POST", "/batches", json=body), Batch)

    def batch(self, batch_id: str) -> Batch:
        return _decode(self._request("GET", f"/batches/{batch_id}"), Batch)

    def batches(
        self, limit: int, status: str | None = None, after: str | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of batches as the API answered them (see :func:`as_batch`), and whether more
        follow."""
        params: dict[str, str | int] = {"limit": limit}
        if status is not None:
            params["status"] = status
        if after is not None:
            params["after"] = after
        page = _decode(self._request("GET", "/batches", params=params), _Page)
        return msgspec.convert(page.data, list[dict[str, Any]]), page.has_more

    def cancel(self, batch_id: str) -> Batch:
        return _decode(self._request("POST", f"/batches/{batch_id}/cancel"), Batch)

    def download(self, file_id: str, dest: Path) -> int:
        """Stream a file's content to ``dest`` (written whole or not at all); returns its
        number of lines."""
        partial = dest.with_name(f".{dest.name}.part")
        lines = 0
        try:
            with self._stream(f"/files/{file_id}/content") as response, partial.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    lines += chunk.count(b"\n")
            os.replace(partial, dest)
        finally:
            partial.unlink(missing_ok=True)
        return lines

    @contextmanager
    def _stream(self, path: str) -> Iterator[httpx.Response]:
        try:
            with self._http.stream("GET", path, timeout=httpx.Timeout(None, connect=10.0)) as response:  # fmt: skip
                if response.is_error:
                    response.read()
                    _check(response)
                yield response
        except httpx.TransportError as exc:
            raise ClientError(f"download of {path} broke off: {exc}") from None

    def keys(self) -> list[dict[str, Any]]:
        """Your keys as the API answered them (the CLI reads them as :class:`Key`)."""
        page = _decode(self._request("GET", "/keys"), _Page)
        return msgspec.convert(page.data, list[dict[str, Any]])

    def revoke_key(self, key_id: str) -> Key:
        return _decode(self._request("DELETE", f"/keys/{key_id}"), Key)


def as_batch(answered: dict[str, Any]) -> Batch:
    """The fields of a batch object the CLI shows."""
    try:
        return msgspec.convert(answered, Batch)
    except msgspec.ValidationError as exc:
        raise ClientError(f"the API answered a batch this client cannot read: {exc}") from None


def _check(response: httpx.Response) -> None:
    if not response.is_error:
        return
    message, code = response.reason_phrase, None
    try:
        error = response.json()["error"]
        message, code = error["message"], error.get("code")
    except (ValueError, KeyError, TypeError):
        pass
    raise ClientError(f"{message} (HTTP {response.status_code})", response.status_code, code)


def _decode(response: httpx.Response, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(response.content, type=kind)
    except msgspec.DecodeError as exc:  # a proxy's page, another service on that port
        raise ClientError(
            f"the answer from {response.url} is not the API's ({exc}); is --api-url right?"
        ) from None
