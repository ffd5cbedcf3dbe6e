"""The realtime proxy's upstream client (§7.2): one aiohttp session shared by every realtime
call, and the model's own credential, never the caller's (README decisions)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from types import TracebackType

import aiohttp

from cannonade.config import ModelConfig
from schemas.errors import ApiError
from streams.execution.client import _sse_data

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 30.0


@contextlib.contextmanager
def _failures(model: str) -> Iterator[None]:
    """Transport failures as the answer the caller gets; the upstream's address stays private."""
    try:
        yield
    except TimeoutError as exc:
        log.warning("upstream of %s timed out: %r", model, exc)
        raise ApiError(504, f"The upstream of model '{model}' did not answer in time") from exc
    except aiohttp.ClientError as exc:
        log.warning("upstream of %s failed: %r", model, exc)
        raise ApiError(
            502, f"The upstream of model '{model}' could not be reached ({type(exc).__name__})"
        ) from exc


class Reply:
    """An upstream answer whose headers arrived. Leaving it normally returns the connection to
    the pool; leaving it on an error or a cancellation aborts the upstream call."""

    def __init__(self, response: aiohttp.ClientResponse, model: str) -> None:
        self._response = response
        self._model = model

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def streamed(self) -> bool:
        return self._response.content_type == "text/event-stream"

    async def read(self) -> bytes:
        with _failures(self._model):
            return await self._response.read()

    async def events(self) -> AsyncIterator[str]:
        """The data of each server-sent event. Only reading is guarded: what the consumer does
        between events (writing to its own client) fails as itself."""
        events = _sse_data(self._response.content)
        while True:
            with _failures(self._model):
                data = await anext(events, None)
            if data is None:
                return
            yield data

    async def __aenter__(self) -> Reply:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, _: BaseException | None, __: TracebackType | None
    ) -> None:
        if kind is None:
            self._response.release()
        else:
            self._response.close()


class Upstream:
    def __init__(self, read_timeout_s: float) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            # Between bytes, not overall: a long generation that keeps streaming is fine.
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=_CONNECT_TIMEOUT_S, sock_read=read_timeout_s
            ),
            # Requests of many users share the session: never carry cookies between them.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        await self._session.close()

    async def send(
        self, name: str, model: ModelConfig, path: str, body: bytes, request_id: str
    ) -> Reply:
        headers = {"Content-Type": "application/json", "X-Fusillade-Request-Id": request_id}
        if model.api_key:
            headers["Authorization"] = f"Bearer {model.api_key}"
        with _failures(name):
            response = await self._session.post(model.upstream + path, data=body, headers=headers)
        return Reply(response, name)
