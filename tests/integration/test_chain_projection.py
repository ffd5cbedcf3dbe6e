"""The responses.v1 projection (§1.2, §9.4) on a database of its own, fed records by hand: step
events projected before their payloads get them later, §1.2 holds at every moment, the first
terminal fact wins however the records are grouped into polls, steps move as the chain agent
moves them, replays change nothing, and an erased payload leaves its step."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

import asyncpg
import msgspec
import pytest
from aiokafka.structs import ConsumerRecord

from compose import stack
from projections import writers
from schemas import codec, topics
from schemas.bodies import BodyRef
from schemas.events import (
    BatchlessFacts,
    ChainStarted,
    ResponseFinalized,
    StepCompleted,
    StepFailed,
    StepRecorded,
    StepStarted,
)
from streams.responses.steps import StepFact, StepState, step_after, step_id
from tests.integration.conftest import consumer_record, own_database, run

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)
REF = BodyRef(0, 0)


@pytest.fixture(scope="module")
def dsn(stack_info: stack.StackInfo) -> Iterator[str]:
    yield from own_database(stack_info, "chain_projection")


class Log:
    """Records of responses.v1 and the bodies topic, with offsets in order."""

    def __init__(self) -> None:
        self.offsets: dict[str, int] = {}

    def event(self, event: Any) -> ConsumerRecord:
        return self._record(topics.RESPONSES.name, event.response_id.encode(), codec.encode(event))

    def body(self, key: str, value: Any) -> ConsumerRecord:
        raw = None if value is None else msgspec.json.encode(value)
        return self._record(topics.BODIES.name, key.encode(), raw)

    def _record(self, topic: str, key: bytes, value: bytes | None) -> ConsumerRecord:
        offset = self.offsets.get(topic, 0)
        self.offsets[topic] = offset + 1
        return consumer_record(topic, offset, key, value)


class Chain:
    def __init__(self) -> None:
        self.head = str(uuid.uuid4())
        self.now = T0

    def at(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now

    def started(self) -> ChainStarted:
        facts = BatchlessFacts(owner="u", path="/v1/responses", service_tier="priority", created_at=T0, deadline=T0)  # fmt: skip
        return ChainStarted(event_id="e", occurred_at=T0, response_id=self.head, model="m", parent=REF, resolved_tool_names=[], facts=facts)  # fmt: skip

    def recorded(self, sequence: int, kind: str = "model_call") -> StepRecorded:
        sid = step_id(self.head, sequence)
        return StepRecorded(
            event_id="e", occurred_at=self.at(), response_id=self.head, step_id=sid,
            request_id=(self.head if sequence == 1 else str(uuid.uuid4())) if kind == "model_call" else None,
            prev_step_id=None if sequence == 1 else step_id(self.head, sequence - 1),
            parent_step_id=None if sequence == 1 else self.head, kind=kind,  # type: ignore[arg-type]
            sequence=sequence, payload=REF,
        )  # fmt: skip

    def started_step(self, sequence: int) -> StepStarted:
        return StepStarted(event_id="e", occurred_at=self.at(), response_id=self.head, step_id=step_id(self.head, sequence))  # fmt: skip

    def completed(self, sequence: int) -> StepCompleted:
        return StepCompleted(event_id="e", occurred_at=self.at(), response_id=self.head, step_id=step_id(self.head, sequence), payload=REF)  # fmt: skip

    def failed(self, sequence: int) -> StepFailed:
        return StepFailed(event_id="e", occurred_at=self.at(), response_id=self.head, step_id=step_id(self.head, sequence), error=REF)  # fmt: skip


async def _apply(dsn: str, *polls: list[ConsumerRecord]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for records in polls:
            async with conn.transaction():
                assert (await writers.apply(conn, records)).rejected == []
    finally:
        await conn.close()


async def _steps(dsn: str, head: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT * FROM response_steps WHERE id = $1 OR parent_step_id = $1 ORDER BY step_sequence",  # fmt: skip
            uuid.UUID(head),
        )
        return [dict(r) for r in rows]
    finally:
        await conn.close()


def test_payloads_that_arrive_after_their_steps_are_filled_in(dsn: str) -> None:
    log, chain = Log(), Chain()
    first = [
        log.event(chain.started()), log.event(chain.recorded(1)),
        log.event(chain.started_step(1)), log.event(chain.completed(1)),
        log.event(chain.recorded(2, "tool_call")), log.event(chain.failed(2)),
    ]  # fmt: skip
    run(_apply(dsn, first))
    head, tool = run(_steps(dsn, chain.head))
    # Consistent with §1.2 already: a failed step has an error, though not yet its own.
    assert (head["state"], head["response_payload"], head["request_payload"]) == ("completed", None, None)  # fmt: skip
    assert head["started_at"] is not None and head["completed_at"] is not None
    assert (tool["state"], tool["error"], tool["started_at"]) == ("failed", b'{"type":"step_failed"}', None)  # fmt: skip
    error = {"type": "executor_error", "message": "executor error: boom"}
    late = [
        log.body(f"sreq:{chain.head}", {"model": "m"}), log.body(f"sres:{chain.head}", {"choices": []}),
        log.body(f"sreq:{step_id(chain.head, 2)}", {"name": "t"}),
        log.body(f"serr:{step_id(chain.head, 2)}", error),
    ]  # fmt: skip
    run(_apply(dsn, late))
    head, tool = run(_steps(dsn, chain.head))
    assert msgspec.json.decode(head["request_payload"]) == {"model": "m"}
    assert msgspec.json.decode(head["response_payload"]) == {"choices": []}
    assert msgspec.json.decode(tool["error"]) == error
    assert msgspec.json.decode(tool["request_payload"]) == {"name": "t"}
    # Everything again, in one poll this time: nothing changes.
    before = run(_steps(dsn, chain.head))
    run(_apply(dsn, first + late))
    assert run(_steps(dsn, chain.head)) == before


def test_payloads_that_arrive_first_are_copied_at_once(dsn: str) -> None:
    log, chain = Log(), Chain()
    records = [
        log.body(f"sreq:{chain.head}", {"model": "m"}), log.body(f"sres:{chain.head}", {"ok": 1}),
        log.event(chain.started()), log.event(chain.recorded(1)), log.event(chain.completed(1)),
    ]  # fmt: skip
    run(_apply(dsn, records))
    [head] = run(_steps(dsn, chain.head))
    assert head["state"] == "completed" and msgspec.json.decode(head["response_payload"]) == {"ok": 1}  # fmt: skip
    # Completed straight from pending: the start is the completion (§1.2 needs one).
    assert head["started_at"] == head["completed_at"]


@pytest.mark.parametrize("split", [False, True])
def test_the_first_terminal_fact_wins_however_polls_are_cut(dsn: str, split: bool) -> None:
    log, chain = Log(), Chain()
    records = [
        log.event(chain.started()), log.event(chain.recorded(1)), log.event(chain.started_step(1)),
        log.event(chain.failed(1)),  # abandoned...
        log.event(chain.completed(1)),  # ...then the late genuine result: dropped, as by the agent
    ]  # fmt: skip
    polls = [records[:4], records[4:]] if split else [records]
    run(_apply(dsn, *polls))
    [head] = run(_steps(dsn, chain.head))
    assert head["state"] == "failed" and head["completed_at"] is None
    assert head["updated_at"] == chain.now  # the last fact's time, however grouped


# Every sequence of up to three facts about one step, repeats and late starts included.
_FACT_SEQUENCES: list[tuple[StepFact, ...]] = [
    seq for n in range(1, 4) for seq in itertools.product(get_args(StepFact), repeat=n)
]


@pytest.mark.parametrize("poll_per_fact", [False, True])
def test_the_projection_moves_steps_as_the_chain_agent_does(dsn: str, poll_per_fact: bool) -> None:
    """One state machine: whatever facts a step hears, in one poll or a poll each, the
    projector leaves it in the state ``step_after`` gives the chain agent; §1.2 holds
    throughout (a write that broke a CHECK constraint would fail the poll)."""
    log = Log()
    setup: list[ConsumerRecord] = []
    facts: list[list[ConsumerRecord]] = [[], [], []]  # the sequences' first, second, third facts
    expected: dict[str, str] = {}
    for sequence in _FACT_SEQUENCES:
        chain = Chain()
        setup += [log.event(chain.started()), log.event(chain.recorded(1))]
        made = {"started": chain.started_step, "completed": chain.completed, "failed": chain.failed}
        state = StepState.PENDING
        for i, fact in enumerate(sequence):
            facts[i].append(log.event(made[fact](1)))
            state = step_after(state, fact) or state
        expected[chain.head] = state.value
    polls = [setup, *facts] if poll_per_fact else [setup + [r for poll in facts for r in poll]]
    run(_apply(dsn, *polls))

    async def states() -> dict[str, str]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT id::text, state FROM response_steps WHERE id = ANY($1::uuid[])",
                list(expected),
            )
            return {r["id"]: r["state"] for r in rows}
        finally:
            await conn.close()

    assert run(states()) == expected


def test_an_erased_payload_leaves_its_step(dsn: str) -> None:
    log, chain = Log(), Chain()
    run(_apply(dsn, [
        log.body(f"sreq:{chain.head}", {"model": "m"}), log.body(f"sres:{chain.head}", {"ok": 1}),
        log.event(chain.started()), log.event(chain.recorded(1)), log.event(chain.completed(1)),
    ]))  # fmt: skip
    run(_apply(dsn, [log.body(f"sreq:{chain.head}", None), log.body(f"sres:{chain.head}", None)]))
    [head] = run(_steps(dsn, chain.head))
    assert head["request_payload"] is None and head["response_payload"] is None
    assert head["state"] == "completed"


def test_the_chain_record_notes_its_finalisation_once(dsn: str) -> None:
    log, chain = Log(), Chain()
    done = ResponseFinalized(event_id="e", occurred_at=chain.at(), response_id=chain.head, status=200, body=REF)  # fmt: skip
    run(_apply(dsn, [log.event(chain.started()), log.event(done)]))

    async def fetch() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchrow("SELECT * FROM response_chains WHERE id = $1", uuid.UUID(chain.head))  # fmt: skip
        finally:
            await conn.close()

    row = run(fetch())
    assert (row["owner"], row["model"], row["final_status"], row["finalized_at"]) == ("u", "m", 200, done.occurred_at)  # fmt: skip
