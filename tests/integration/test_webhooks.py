"""Batch notifications to webhook endpoints, end to end with two API processes delivering: a
receiver on loopback checks every signature (with the openai SDK) and sees exactly one
delivery per terminal batch (completed, failed, cancelled, expired); a failing receiver gets
retries with backoff, visible through the API; a read model rebuilt from the log would not
notify again."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from openai import OpenAI

from compose import postgres, stack
from compose.services import Services
from projections.api.auth import create_key
from projections.webhook_signing import new_key
from schemas import codec, topics
from schemas.events import BatchNotified
from tests.integration.conftest import (
    caught_up,
    chat_line,
    eventually,
    jsonl,
    project_to_end,
    read_topic,
    run,
    wait_for_batch,
)

pytestmark = pytest.mark.integration

MAX_ATTEMPTS = 4
BACKOFF_S = 0.5  # then 1 s, 2 s
WEBHOOK_CONFIG = f"""
[webhooks]
secret_keys = ["{new_key()}"]
poll_interval_ms = 200
backoff_ms = {int(BACKOFF_S * 1000)}
backoff_factor = 2.0
max_backoff_ms = 10000
max_attempts = {MAX_ATTEMPTS}
timeout_ms = 3000
private_hosts = true  # the receivers listen on loopback
"""


# What a failing endpoint answers: a NUL byte, which PostgreSQL text cannot hold, among it.
FAILURE = b"broke\x00down"


class Receiver:
    """Webhook endpoints on loopback: ``/ok/<name>`` answers 204, ``/fail/<name>`` 500. Each
    delivery is verified with the secret registered for its path and kept."""

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    event = OpenAI(api_key="unused").webhooks.unwrap(
                        body, headers, secret=receiver.secrets[self.path]
                    )
                    verified: Any = event
                except (openai.InvalidWebhookSignatureError, KeyError) as exc:
                    verified = exc
                with receiver.lock:
                    receiver.received.append(
                        {"path": self.path, "at": time.monotonic(), "event": verified,
                         "webhook_id": headers.get("webhook-id")}
                    )  # fmt: skip
                if self.path.startswith("/fail"):
                    self.send_response(500)
                    self.send_header("content-length", str(len(FAILURE)))
                    self.end_headers()
                    self.wfile.write(FAILURE)
                    return
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def at(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.received if r["path"] == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.server.shutdown()


@pytest.fixture(scope="module")
def webhook_config(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tmp_path_factory.mktemp("webhooks") / "cannonade.toml"
    config.write_text(Path(services.config_path).read_text() + WEBHOOK_CONFIG)
    return config


@pytest.fixture(scope="module")
def api_urls(services: Services, webhook_config: Path) -> list[str]:
    """Two more API processes with webhooks enabled: both run the notifier."""
    env = {"CANNONADE_CONFIG": str(webhook_config)}
    names = [services.start_api(n, env=env) for n in (101, 102)]
    for name in names:
        services.wait_ready(name)
    return [services.api_urls[name] for name in names]


class User:
    def __init__(self, name: str, api: str, stack_info: stack.StackInfo) -> None:
        key = run(create_key(stack_info.kafka_bootstrap, stack_info.database_url, name))
        self.http = httpx.Client(
            base_url=f"{api}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        self.openai = OpenAI(base_url=f"{api}/v1", api_key=key, max_retries=0, timeout=60)

    def register(self, receiver: Receiver, path: str) -> dict[str, Any]:
        answer = self.http.post("/webhooks", json={"url": receiver.url + path, "name": path})
        assert answer.status_code == 201, answer.text
        endpoint: dict[str, Any] = answer.json()
        assert endpoint["signing_secret"].startswith("whsec_")
        receiver.secrets[path] = endpoint["signing_secret"]
        return endpoint

    def deliveries(self, webhook_id: str) -> list[dict[str, Any]]:
        answer = self.http.get(f"/webhooks/{webhook_id}/deliveries", params={"limit": 100})
        assert answer.status_code == 200, answer.text
        return answer.json()["data"]  # type: ignore[no-any-return]

    def batch(self, lines: list[dict[str, Any]], window: str = "24h") -> Any:
        uploaded = self.openai.files.create(file=("w.jsonl", jsonl(lines)), purpose="batch")
        return self.openai.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window=window,  # type: ignore[arg-type]  # "15s" is configured here
        )


def test_each_terminal_batch_is_delivered_once_signed_across_two_api_processes(
    services: Services, stack_info: stack.StackInfo, receiver: Receiver, api_urls: list[str]
) -> None:
    alice = User(f"hook-{uuid.uuid4().hex[:6]}", api_urls[0], stack_info)
    endpoint = alice.register(receiver, "/ok/alice")
    listed = alice.http.get("/webhooks").json()["data"]
    assert [e["id"] for e in listed] == [endpoint["id"]] and "signing_secret" not in listed[0]

    completed = [alice.batch([chat_line(f"c{i}", model="chat-b") for i in range(3)]) for _ in range(3)]  # fmt: skip
    failed = alice.batch([chat_line("f", model="chat-b", status=400)])
    cancelled = alice.batch([chat_line("x", model="chat-b", latency_ms=60_000)])
    expired = alice.batch([chat_line("e", model="chat-b", latency_ms=60_000)], window="15s")
    wait_for_batch(alice.openai, cancelled.id, {"in_progress"})
    alice.openai.batches.cancel(cancelled.id)
    expected = {b.id: "batch.completed" for b in completed} | {
        failed.id: "batch.failed",
        cancelled.id: "batch.cancelled",
        expired.id: "batch.expired",
    }
    for batch_id, kind in expected.items():
        status = wait_for_batch(alice.openai, batch_id, timeout_s=180).status
        assert f"batch.{status}" == kind

    # The read model says each was delivered: no process will send it again. Only then does
    # the receiver's count mean "exactly once".
    def all_delivered() -> list[dict[str, Any]] | None:
        found = alice.deliveries(endpoint["id"])
        ok = len(found) == len(expected) and all(d["status"] == "delivered" for d in found)
        return found if ok else None

    deliveries = eventually(all_delivered, "every notification to be delivered")
    assert all(len(d["attempts"]) == 1 for d in deliveries)
    got = receiver.at("/ok/alice")
    assert not [r for r in got if isinstance(r["event"], Exception)]
    assert sorted(r["event"].data.id for r in got) == sorted(expected)
    assert {r["event"].data.id: r["event"].type for r in got} == expected
    assert {r["webhook_id"] for r in got} == {d["id"] for d in deliveries}
    assert {d["batch_id"]: d["event_type"] for d in deliveries} == expected
    # One notification decided per batch, though two processes looked for terminal batches.
    notified = [
        e
        for r in run(read_topic(stack_info.kafka_bootstrap, topics.BATCHES))
        if isinstance(e := codec.batch_events.decode(r.value), BatchNotified)
        and e.batch_id in expected
    ]
    assert sorted(e.batch_id for e in notified) == sorted(expected)

    # Another API process serves the same endpoints and deliveries.
    other = httpx.Client(base_url=f"{api_urls[1]}/v1", headers=alice.http.headers)
    assert len(other.get(f"/webhooks/{endpoint['id']}/deliveries").json()["data"]) == len(expected)

    # A rebuilt read model knows every batch was notified and has nothing left to deliver.
    async def rebuilt() -> tuple[int, int]:
        await caught_up(stack_info.database_url, stack_info.kafka_bootstrap, "projector")
        name = f"webhooks_replay_{uuid.uuid4().hex[:8]}"
        dsn = await postgres.create_database(stack_info.admin_database_url, name)
        try:
            await project_to_end(dsn, stack_info.kafka_bootstrap)
            conn = await asyncpg.connect(dsn)
            try:
                stamped = await conn.fetchval(
                    "SELECT count(*) FROM batches WHERE id = ANY($1::uuid[])"
                    " AND notification_sent_at IS NOT NULL",
                    list(expected),
                )
                open_ = await conn.fetchval(
                    "SELECT count(*) FROM webhook_open o JOIN webhook_deliveries d"
                    " ON d.id = o.delivery_id WHERE d.batch_id = ANY($1::uuid[])",
                    list(expected),
                )
                return int(stamped), int(open_)
            finally:
                await conn.close()
        finally:
            await postgres.drop_database(stack_info.admin_database_url, name)

    assert run(rebuilt()) == (len(expected), 0)

    # A deleted endpoint is gone from listings.
    assert alice.http.delete(f"/webhooks/{endpoint['id']}").json()["deleted"] is True
    assert alice.http.get("/webhooks").json()["data"] == []
    assert alice.http.get(f"/webhooks/{endpoint['id']}").status_code == 404


def test_a_failing_endpoint_gets_retries_with_backoff_visible_through_the_api(
    services: Services, stack_info: stack.StackInfo, receiver: Receiver, api_urls: list[str]
) -> None:
    bob = User(f"hook-{uuid.uuid4().hex[:6]}", api_urls[1], stack_info)
    endpoint = bob.register(receiver, "/fail/bob")
    batch = bob.batch([chat_line("b", model="chat-b")])
    assert wait_for_batch(bob.openai, batch.id).status == "completed"

    def given_up() -> dict[str, Any] | None:
        found = bob.deliveries(endpoint["id"])
        return found[0] if found and found[0]["status"] == "failed" else None

    delivery = eventually(given_up, "the delivery to be given up")
    attempts = delivery["attempts"]
    assert [a["attempt"] for a in attempts] == list(range(1, MAX_ATTEMPTS + 1))
    assert all(a["status_code"] == 500 for a in attempts)
    assert {a["error"] for a in attempts} == {"broke\ufffddown"}
    assert [a["outcome"] for a in attempts] == ["retry"] * (MAX_ATTEMPTS - 1) + ["failed"]
    assert delivery["batch_id"] == batch.id and delivery["next_attempt_at"] is None
    got = receiver.at("/fail/bob")
    assert len(got) == MAX_ATTEMPTS  # exactly one call per recorded attempt
    assert all(r["webhook_id"] == delivery["id"] for r in got)  # one id through its retries
    assert not [r for r in got if isinstance(r["event"], Exception)]
    gaps = [b["at"] - a["at"] for a, b in zip(got, got[1:], strict=False)]
    for n, gap in enumerate(gaps):
        assert gap >= BACKOFF_S * 2**n * 0.9, gaps


def test_the_cli_registers_lists_and_deletes_endpoints(
    services: Services, webhook_config: Path, receiver: Receiver
) -> None:
    user = f"hook-cli-{uuid.uuid4().hex[:6]}"
    env = {**services.env, "CANNONADE_CONFIG": str(webhook_config)}

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "cannonade.cli", "webhooks", *args],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    created = cli("create", "--user", user, "--url", receiver.url + "/ok/cli", "--event-type", "batch.failed")  # fmt: skip
    webhook_id = created.split()[0]
    assert "signing secret: whsec_" in created
    listed = cli("list", "--user", user)
    assert webhook_id in listed and "batch.failed" in listed and "whsec_..." in listed
    (endpoint,) = map(json.loads, cli("list", "--user", user, "--json").splitlines())
    assert (endpoint["id"], endpoint["object"], endpoint["event_types"]) == (webhook_id, "webhook_endpoint", ["batch.failed"])  # fmt: skip
    assert "signing_secret" not in endpoint
    assert cli("delete", webhook_id, "--user", user).strip() == f"deleted {webhook_id}"
    assert cli("list", "--user", user) == ""
