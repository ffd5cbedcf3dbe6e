"""``/v1/keys``: a user's own API keys, listed and revoked with one of them (no operator
needed). Revocation goes through the keys topic like ``cannonade admin keys revoke``; keys
are issued by an operator (``cannonade admin keys create``)."""

from __future__ import annotations

from aiohttp import web

from projections.api.app import context, json_response, principal
from projections.api.auth import KeyInfo, list_keys, publish_revocation
from projections.api.files import parse_uuid
from schemas.api_keys import ApiKeyList, ApiKeyObject
from schemas.errors import not_found


def routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/keys", list_own)
    router.add_delete("/v1/keys/{id}", revoke)


def key_object(key: KeyInfo, current_key_id: str) -> ApiKeyObject:
    return ApiKeyObject(
        id=key.id,
        object="api_key",
        created_at=int(key.created_at.timestamp()),
        revoked_at=None if key.revoked_at is None else int(key.revoked_at.timestamp()),
        current=key.id == current_key_id,
    )


async def list_own(request: web.Request) -> web.Response:
    ctx, who = context(request), principal(request)
    keys = await list_keys(ctx.pool, who.user)
    return json_response(ApiKeyList(object="list", data=[key_object(k, who.key_id) for k in keys]))


async def revoke(request: web.Request) -> web.Response:
    """Revoke one of the caller's keys (the one in use too); it stops working once this
    answers. Revoking a revoked key changes nothing; another user's key is not found."""
    ctx, who = context(request), principal(request)
    key_id = parse_uuid(request.match_info["id"], "Invalid API key ID format")

    async def own() -> KeyInfo | None:
        return next((k for k in await list_keys(ctx.pool, who.user) if k.id == key_id), None)

    key = await own()
    if key is None:
        raise not_found("API key", key_id)
    if key.revoked_at is None:
        await publish_revocation(ctx.publisher, ctx.pool, key_id)

        async def revoked() -> bool:
            found = await own()
            return found is not None and found.revoked_at is not None

        await ctx.wait_for(revoked, "the revocation")
        key = await own() or key
    return json_response(key_object(key, who.key_id))
