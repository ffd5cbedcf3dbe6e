"""What the chain agent keeps per response in its changelog-backed table (responses §9.3).

Values stay small: payloads live on the bodies topic and the table holds their refs. A chain
that ended keeps only what a late event or a re-dispatched head needs (its claims and its
outcome), not its steps.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from schemas.bodies import BodyRef
from schemas.events import BatchlessFacts, ChainHead
from streams.responses.steps import StepKind, StepState


class StepEntry(msgspec.Struct, array_like=True):
    """One step as the agent tracks it; its payloads are the bodies at ``payload`` (sreq) and
    ``result`` (sres when completed, serr when failed)."""

    id: str
    step_kind: StepKind
    step_sequence: int
    state: StepState
    prev: str | None
    request_id: str | None
    tool: str | None
    payload: BodyRef
    result: BodyRef | None = None
    row_model: str | None = None  # a non-head model call's: the model of its request row
    # When its work was first handed out (None in entries stored before it was kept): its
    # step executor's ledger reads the chain log from there, so it goes out again with it.
    recorded_at: datetime | None = None


class FinalOutcome(msgspec.Struct, array_like=True, frozen=True):
    """How the head row ended: re-reported to a later claim of the same head."""

    status: int
    size: int


class ChainState(msgspec.Struct, kw_only=True):
    response_id: str
    model: str
    parent: BodyRef  # the request body (after tool injection)
    tools: list[str]  # resolved_tool_names
    facts: BatchlessFacts  # owner, api key id, created_at: what sub-request rows inherit
    head: ChainHead | None  # the claim that holds the head row; None: a realtime head
    claims: list[str]  # every head claim seen, so a redelivered ChainStarted is recognised
    max_iterations: int
    partition: int = -1  # of the responses topic: which worker owns the chain
    evaluations: int = 0  # persisted: the iteration cap spans workers (§2.10)
    steps: list[StepEntry] = []
    terminal: bool = False
    final: FinalOutcome | None = None

    def step(self, step_id: str) -> StepEntry | None:
        return next((s for s in self.steps if s.id == step_id), None)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ChainState)


def encode(state: ChainState) -> bytes:
    return _encoder.encode(state)


def decode(raw: bytes) -> ChainState:
    return _decoder.decode(raw)
