"""What a request without a batch must be before it is routed: model access and type (§8.1,
§8.2), and the body a flex request hands to the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cannonade.config import Config, ModelConfig
from projections.api.intake import flex_body, is_flex, read_body, requested_model, usable_model
from schemas.errors import ApiError

CONFIG = Config(
    models={
        "chat": ModelConfig(kind="chat"),
        "embed": ModelConfig(kind="embeddings"),
        "private": ModelConfig(kind="chat", users=["bob"]),
    }
)


def refusal(model: str, user: str, path: str) -> ApiError:
    with pytest.raises(ApiError) as info:
        usable_model(CONFIG, model, user, path)
    return info.value


def test_a_model_the_caller_may_use_on_its_endpoint() -> None:
    assert usable_model(CONFIG, "chat", "alice", "/v1/responses") is CONFIG.models["chat"]
    assert usable_model(CONFIG, "embed", "alice", "/v1/embeddings") is CONFIG.models["embed"]
    assert usable_model(CONFIG, "private", "bob", "/v1/chat/completions").users == ["bob"]


@pytest.mark.parametrize("model", ["missing", "private"])
def test_an_unknown_or_foreign_model_is_403_like_the_reference(model: str) -> None:
    error = refusal(model, "alice", "/v1/chat/completions")
    assert (error.status, error.code, error.param) == (403, "model_not_accessible", "model")
    assert error.message == (
        f"You do not have access to '{model}'. Please contact your administrator to request access."
    )


def test_a_model_of_the_wrong_type_is_400() -> None:
    error = refusal("embed", "alice", "/v1/chat/completions")
    assert (error.status, error.type) == (400, "invalid_request_error")
    assert error.message == (
        "Model 'embed' is a EMBEDDINGS model but endpoint '/v1/chat/completions' requires a "
        "CHAT model"
    )
    assert refusal("chat", "alice", "/v1/embeddings").status == 400
    assert refusal("ch\x00at", "alice", "/v1/embeddings").status == 400  # never stored


def test_the_model_must_be_a_string() -> None:
    assert requested_model({"model": "chat"}) == "chat"
    for body in ({}, {"model": 5}, {"model": None}):
        with pytest.raises(ApiError) as info:
            requested_model(body)
        assert (info.value.status, info.value.param) == (400, "model")


def test_a_flex_body_keeps_what_the_upstream_computes_and_drops_how_it_is_run() -> None:
    body = {
        "model": "chat", "messages": [], "service_tier": "flex", "background": True,
        "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
    }  # fmt: skip
    assert is_flex(body) and not is_flex({"service_tier": "auto"}) and not is_flex({})
    assert msgspec.json.decode(flex_body(body)) == {
        "model": "chat", "messages": [], "temperature": 0,
    }  # fmt: skip


async def test_a_body_sent_in_chunks_is_refused_once_it_passes_the_limit() -> None:
    # A chunked body names no length: without a limit of its own a JSON endpoint would buffer
    # up to the server's cap, the file upload's (~200 MiB), before any check.
    read: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        try:
            body = await read_body(request, 1000)
        except ApiError as exc:
            return web.json_response({"code": exc.code, "message": exc.message}, status=exc.status)
        read.append(len(body))
        return web.json_response({"read": len(body)})

    async def chunks(count: int) -> AsyncIterator[bytes]:
        for _ in range(count):
            yield b"x" * 400

    app = web.Application()
    app.router.add_post("/", handler)
    async with TestClient(TestServer(app)) as client:
        small = await client.post("/", data=chunks(2))
        assert small.status == 200 and await small.json() == {"read": 800}
        large = await client.post("/", data=chunks(2_000))  # 800 KB
        assert large.status == 413
        assert await large.json() == {
            "code": "request_too_large",
            "message": "Request body exceeds the maximum allowed size of 1000 bytes",
        }
        sized = await client.post("/", data=b"x" * 1001)  # refused on its Content-Length
        assert sized.status == 413 and (await sized.json())["code"] == "request_too_large"
    assert read == [800]
