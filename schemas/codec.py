"""Encoding and decoding of everything that crosses Kafka, in one place.

Decoders are built once; a payload that fails to decode raises :class:`msgspec.DecodeError`
or :class:`msgspec.ValidationError`, which the agents turn into dead letters. Each enforces its
contract's excluded characters too (:mod:`schemas.excluded`).
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
from schemas.excluded import Decoder

_encoder = msgspec.json.Encoder()

commands = Decoder(AnyCommand)
file_events = Decoder(FileEvent)
batch_events = Decoder(BatchEvent)
lifecycle = Decoder(RequestTransitions)
gate_inputs = Decoder(GateInput)
dispatches: Decoder[DispatchMessage] = Decoder(DispatchMessage)
model_filters = Decoder(ModelFilterAppended)
worker_events = Decoder(WorkerEvent)
api_keys = Decoder(ApiKey)
chain_events = Decoder(ChainEvent)
step_work = Decoder(StepWork)
webhooks = Decoder(WebhookEndpoint)
webhook_attempts = Decoder(WebhookAttempted)

DecodeErrors = (msgspec.DecodeError, msgspec.ValidationError)


def encode(value: Any) -> bytes:
    return _encoder.encode(value)
