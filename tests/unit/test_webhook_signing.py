"""Webhook signatures (Standard Webhooks, as OpenAI signs), sealed secrets, and the notifier's
pure rules: event types, payloads, backoff."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import openai
import pytest
from click.testing import CliRunner
from openai import OpenAI

from cannonade import cli
from cannonade.config import WebhooksConfig
from projections import notifier
from projections.webhook_signing import (
    SecretBox,
    SecretError,
    generate_secret,
    headers,
    new_key,
    secret_bytes,
    secret_hint,
)
from projections.webhooks import check_registration
from schemas.api_webhooks import WebhookRegistration as Registration
from schemas.errors import ApiError

WEBHOOK = "6f1c4a53-3a0e-4d61-9d2e-0c2b8e7c4a11"


def test_a_signed_delivery_verifies_with_the_openai_sdk() -> None:
    secret = generate_secret()
    body = notifier.payload("evt_1", "batch.completed", datetime.now(UTC), "b-1")
    sent = headers(secret, "wh_1", int(time.time()), body)
    event = OpenAI(api_key="x").webhooks.unwrap(body, sent, secret=secret)
    assert event.type == "batch.completed" and event.data.id == "b-1" and event.id == "evt_1"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        OpenAI(api_key="x").webhooks.unwrap(body + b" ", sent, secret=secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        OpenAI(api_key="x").webhooks.unwrap(body, sent, secret=generate_secret())


def test_secrets_are_whsec_base64_of_24_to_64_bytes() -> None:
    assert len(secret_bytes(generate_secret())) == 32
    for bad in ("abc", "whsec_***", "whsec_" + "QUFB" * 2):
        with pytest.raises(SecretError):
            secret_bytes(bad)
    assert secret_hint("whsec_abcdefgh").endswith("efgh")


def _cli_key() -> str:
    result = CliRunner().invoke(cli.main, ["webhooks", "new-key"])
    assert result.exit_code == 0, result.output
    return result.output.strip()


def test_the_cli_prints_a_fresh_key_that_seals_and_opens() -> None:
    key, other = _cli_key(), _cli_key()
    assert len(base64.b64decode(key)) == 32 and key != other
    box = SecretBox([key])
    secret = generate_secret()
    assert box.open(WEBHOOK, box.seal(WEBHOOK, secret)) == secret


def test_a_sealed_secret_opens_only_for_its_endpoint_and_with_a_configured_key() -> None:
    old, new = new_key(), new_key()
    box = SecretBox([old])
    secret = generate_secret()
    sealed = box.seal(WEBHOOK, secret)
    assert secret not in msgspec.json.encode(sealed).decode()
    assert box.open(WEBHOOK, sealed) == secret
    with pytest.raises(SecretError):
        box.open("00000000-0000-0000-0000-000000000000", sealed)
    # Rotation: a new first key seals, the old one still opens what it sealed.
    rotated = SecretBox([new, old])
    assert rotated.open(WEBHOOK, sealed) == secret
    assert rotated.seal(WEBHOOK, secret).key_id != sealed.key_id
    with pytest.raises(SecretError):
        SecretBox([new]).open(WEBHOOK, sealed)
    assert not SecretBox([]).enabled
    with pytest.raises(SecretError):
        SecretBox(["c2hvcnQ="])


def test_registrations_are_checked() -> None:
    ok = check_registration(Registration(url="https://example.com/hook", event_types=["batch.failed", "batch.failed"]))  # fmt: skip
    assert ok.event_types == ["batch.failed"]
    for reg in (
        Registration(url="ftp://example.com"),
        Registration(url="/relative"),
        Registration(url="https://example.com", event_types=[]),
        Registration(url="https://example.com", event_types=["response.completed"]),
        Registration(url="https://example.com", signing_secret="nope"),
    ):
        with pytest.raises(ApiError):
            check_registration(reg)


def test_backoff_grows_to_its_ceiling() -> None:
    config = WebhooksConfig(backoff_ms=1000, backoff_factor=2.0, max_backoff_ms=5000)
    waits = [notifier.backoff(config, n).total_seconds() for n in range(1, 6)]
    assert waits == [1, 2, 4, 5, 5]


def _batch(**fields: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    row: dict[str, Any] = {
        "id": "b", "owner": "u", "retry_version": 0, "created_at": now - timedelta(hours=1),
        "expires_at": now + timedelta(hours=23), "requests_started_at": now,
        "cancelling_at": None, "cancelled_at": None, "finalizing_at": None,
        "completed_at": None, "failed_at": None, "counts_frozen_at": None,
        "total_requests": 2, "completed": 0, "failed": 0, "canceled": 0,
    }  # fmt: skip
    row.update(fields)
    return row


def test_the_event_of_each_terminal_state() -> None:
    now = datetime.now(UTC)
    done = {"counts_frozen_at": now, "finalizing_at": now}
    assert notifier.event_type(_batch(**done, completed_at=now, completed=2), now) == "batch.completed"  # fmt: skip
    assert notifier.event_type(_batch(**done, failed_at=now, failed=2), now) == "batch.failed"
    cancelled = {"cancelling_at": now, "cancelled_at": now, "counts_frozen_at": now, "canceled": 2}
    assert notifier.event_type(_batch(**cancelled), now) == "batch.cancelled"
    expired = _batch(**done, failed_at=now, failed=2, expires_at=now - timedelta(minutes=1))
    assert notifier.event_type(expired, now) == "batch.expired"
    # Ended before population: failed, or cancelled first.
    unpopulated = {"requests_started_at": None, "total_requests": 0}
    assert notifier.event_type(_batch(**unpopulated, failed_at=now), now) == "batch.failed"
    assert notifier.event_type(_batch(**unpopulated, cancelling_at=now), now) == "batch.cancelled"
    assert notifier.event_type(_batch(), now) is None  # running


def test_ids_are_stable_per_batch_version_and_endpoint() -> None:
    assert notifier.notification_id("b", 0) == notifier.notification_id("b", 0)
    assert notifier.notification_id("b", 0) != notifier.notification_id("b", 1)
    assert notifier.notification_id("b", 0).startswith("evt_")
    assert notifier.delivery_id("b", 0, "w1") != notifier.delivery_id("b", 0, "w2")
