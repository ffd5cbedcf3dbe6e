"""What every request without a batch goes through before it is routed (§7.1, §8.1, §8.2): a
JSON object body within the size limit, and a model the caller may use on that endpoint."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from cannonade.config import Config, ModelConfig, ModelKind
from schemas.errors import ApiError, invalid_request
from streams.validation import check_storable

# The model type each endpoint needs (the upload rule 8i, applied to direct requests).
_REQUIRED_KIND: dict[str, ModelKind] = {
    "/v1/chat/completions": "chat",
    "/v1/responses": "chat",
    "/v1/embeddings": "embeddings",
}
# Fields that choose how Cannonade runs a flex request, not what the upstream computes (§1.2);
# and streaming, which a flex answer never is (§7.5), so the engine gets one JSON body back.
_FLEX_ONLY_KEYS = ("service_tier", "background", "stream", "stream_options")


def model_kind(config: Config, model: str, user: str) -> ModelKind | None:
    """The model's type if it is configured and the user may use it, else None."""
    found = config.model(model)
    if found is None or (found.users and user not in found.users):
        return None
    return found.kind


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is over ``limit`` bytes: a body sent in
    chunks names no length, and the server's own cap is the file upload's (~200 MiB)."""
    if (request.content_length or 0) > limit:  # refused before it is read
        raise _too_large(limit, request.content_length)
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)  # its whole size is unknown: it is not read to the end
        chunks.append(chunk)
    return b"".join(chunks)


async def read_object(request: web.Request, config: Config) -> tuple[bytes, dict[str, Any]]:
    """The raw body and its JSON object. Every body must fit one record on the bodies topic."""
    raw = await read_body(request, config.api.max_request_body_size)
    try:
        document = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise invalid_request(f"Invalid JSON body: {exc}") from None
    if not isinstance(document, dict):
        raise invalid_request("The request body must be a JSON object")
    return raw, document


def _too_large(limit: int, size: int | None = None) -> ApiError:
    told = (
        "Request body exceeds" if size is None else f"Request body is {size} bytes, which exceeds"
    )
    return ApiError(
        413, f"{told} the maximum allowed size of {limit} bytes", code="request_too_large"
    )


def requested_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str):
        raise invalid_request("Missing 'model' field in request body", param="model")
    return model


def usable_model(config: Config, model: str, user: str, path: str) -> ModelConfig:
    """The model's configuration; 403 when the caller may not use it, 400 on the wrong type."""
    check_storable(model, "model")
    kind = model_kind(config, model, user)
    if kind is None:
        raise ApiError(
            403,
            f"You do not have access to '{model}'. Please contact your administrator to "
            "request access.",
            code="model_not_accessible",
            param="model",
        )
    needed = _REQUIRED_KIND[path]
    if kind != needed:
        raise invalid_request(
            f"Model '{model}' is a {kind.upper()} model but endpoint '{path}' requires a "
            f"{needed.upper()} model",
            param="model",
        )
    return config.models[model]


def is_flex(body: dict[str, Any]) -> bool:
    return body.get("service_tier") == "flex"


def flex_body(body: dict[str, Any]) -> bytes:
    """The body a flex request stores and the engine sends: without the fields above."""
    return msgspec.json.encode({k: v for k, v in body.items() if k not in _FLEX_ONLY_KEYS})
