"""What the notifier keeps of a receiver's answer (projections/notifier.py): the head of an
error body, read as such, never the whole of it: every API replica delivers, and a tenant's
receiver may answer without end."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from cannonade.config import WebhooksConfig
from projections.notifier import Notifier
from projections.webhook_signing import SecretBox, generate_secret, new_key

MIB = 1 << 20


async def test_only_the_head_of_an_endless_error_answer_is_read() -> None:
    written = []

    async def endless(request: web.Request) -> web.StreamResponse:
        answer = web.StreamResponse(status=500)
        await answer.prepare(request)
        try:
            for _ in range(200):  # 200 MiB, unless the notifier stops listening
                await answer.write(b"A" * MIB)
                written.append(MIB)
        except (ConnectionError, RuntimeError):
            pass
        return answer

    app = web.Application()
    app.router.add_post("/", endless)
    box = SecretBox([new_key()])
    webhook = str(uuid.uuid4())
    sealed = box.seal(webhook, generate_secret())
    # private_hosts: the receiver is on loopback here.
    notifier = Notifier(WebhooksConfig(secret_keys=["k"], private_hosts=True), None, None, "", box)  # type: ignore[arg-type]  # fmt: skip
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        notifier._session = session
        row = {
            "id": str(uuid.uuid4()), "webhook_id": webhook, "batch_id": str(uuid.uuid4()),
            "event_type": "batch.completed", "notification_id": "evt_1",
            "terminal_at": datetime.now(UTC), "attempts": 0, "url": str(server.make_url("/")),
            "secret_key_id": sealed.key_id, "secret_sealed": sealed.sealed,
        }  # fmt: skip
        attempt = await notifier._attempt(row)
    assert attempt is not None and (attempt.outcome, attempt.status_code) == ("retry", 500)
    assert attempt.error == "A" * 500
    assert sum(written) < 50 * MIB  # the rest was never read (socket buffers hold a few)
