"""Exports the JSON Schemas of every contract into ``schemas/json/`` for outside consumers,
and the HTTP API's OpenAPI document into ``schemas/openapi.json``.

Run ``python -m schemas.export`` after changing a contract; a test fails while the checked-in
files differ from what this produces.
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec

from schemas import api, openapi
from schemas.bodies import TemplateChunk
from schemas.commands import AnyCommand
from schemas.events import (
    ApiKey,
    BatchEvent,
    ChainEvent,
    DeadLetter,
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
from schemas.topics import ALL as TOPICS

OUT = Path(__file__).parent / "json"
OPENAPI = Path(__file__).parent / "openapi.json"

# One document per topic payload, plus the HTTP API objects.
CONTRACTS: dict[str, object] = {
    "commands": AnyCommand,
    "file-events": FileEvent,
    "batch-events": BatchEvent,
    "request-events": RequestTransitions,
    "gate-inputs": GateInput,
    "dispatch": DispatchMessage,
    "model-filters": ModelFilterAppended,
    "worker-events": WorkerEvent,
    "api-keys": ApiKey,
    "responses": ChainEvent,
    "step-work": StepWork,
    # The value of a `tplc:` record on the bodies topic (other body records are raw bytes).
    "bodies-template-chunk": TemplateChunk,
    "dead-letters": DeadLetter,
    "webhooks": WebhookEndpoint,
    "webhook-deliveries": WebhookAttempted,
    **{f"api-{t.__name__}": t for t in api.API_OBJECTS},
}


def render() -> dict[str, bytes]:
    docs = {
        f"{name}.schema.json": msgspec.json.format(
            msgspec.json.encode(msgspec.json.schema(tp)), indent=2
        )
        + b"\n"
        for name, tp in CONTRACTS.items()
    }
    catalog = [msgspec.structs.asdict(t) for t in TOPICS]
    docs["topics.json"] = msgspec.json.format(msgspec.json.encode(catalog), indent=2) + b"\n"
    return docs


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for old in OUT.glob("*.json"):
        old.unlink()
    for name, content in render().items():
        (OUT / name).write_bytes(content)
    OPENAPI.write_bytes(openapi.render())
    print(f"wrote {len(CONTRACTS) + 1} files to {OUT} and {OPENAPI}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
