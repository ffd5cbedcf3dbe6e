"""Encoding and decoding of everything that crosses Kafka, in one place.

Decoders are built once; a payload that fails to decode raises :class:`msgspec.DecodeError`
or :class:`msgspec.ValidationError`, which the agents turn into dead letters.
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.commands import AnyCommand
from schemas.events import (
    ApiKey,
    BatchEvent,
    ChainEvent,
    DispatchMessage,
    FileEvent,
    GateInput,
    ModelFilterAppended,
    RequestTransitions,
    StepWork,
    WebhookAttempted,
    WebhookEndpoint,
    WorkerEvent,
)

_encoder = msgspec.json.Encoder()

commands = msgspec.json.Decoder(AnyCommand)
file_events = msgspec.json.Decoder(FileEvent)
batch_events = msgspec.json.Decoder(BatchEvent)
lifecycle = msgspec.json.Decoder(RequestTransitions)
gate_inputs = msgspec.json.Decoder(GateInput)
dispatches: msgspec.json.Decoder[DispatchMessage] = msgspec.json.Decoder(DispatchMessage)
model_filters = msgspec.json.Decoder(ModelFilterAppended)
worker_events = msgspec.json.Decoder(WorkerEvent)
api_keys = msgspec.json.Decoder(ApiKey)
chain_events = msgspec.json.Decoder(ChainEvent)
step_work = msgspec.json.Decoder(StepWork)
webhooks = msgspec.json.Decoder(WebhookEndpoint)
webhook_attempts = msgspec.json.Decoder(WebhookAttempted)

DecodeErrors = (msgspec.DecodeError, msgspec.ValidationError)


def encode(value: Any) -> bytes:
    return _encoder.encode(value)
