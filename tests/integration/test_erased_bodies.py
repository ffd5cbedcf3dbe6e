"""A result that races its request's erasure (core §5.3), fed to the projector by hand: met
after the erasure, in a later poll or the same one, it is dropped from the read model and
tombstoned again, so that the compacted topic forgets it too; and so is one the erasure meets
in the read model, which may be newer on the topic than the erasure's own tombstones."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import asyncpg
import pytest
from aiokafka.structs import ConsumerRecord

from compose import stack
from projections import writers
from schemas import bodies, topics
from schemas.events import RequestErased
from tests.integration.conftest import (
    consumer_record,
    flex_created,
    own_database,
    requests_record,
    run,
)

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def dsn(stack_info: stack.StackInfo) -> Iterator[str]:
    yield from own_database(stack_info, "erased_bodies")


class Flex:
    """One flex request's records: created, erased, and its result."""

    def __init__(self) -> None:
        self.id = str(uuid.uuid4())
        self.key = bodies.key(bodies.RESULT, self.id).encode()

    def created(self) -> ConsumerRecord:
        return requests_record(0, b"m", flex_created(self.id, T0))

    def erased(self) -> ConsumerRecord:
        return requests_record(1, b"m", RequestErased(event_id="e", occurred_at=T0, request_id=self.id, batch_id=None, model="m"))  # fmt: skip

    def result(self) -> ConsumerRecord:
        return consumer_record(topics.BODIES.name, 0, self.key, b'{"secret":"text"}')


async def _project(dsn: str, flex: Flex, *polls: list[ConsumerRecord]) -> tuple[list[tuple[bytes, int]], int]:  # fmt: skip
    """The tombstones the polls asked for, and the request's bodies left in the read model."""
    conn = await asyncpg.connect(dsn)
    tombstones: list[tuple[bytes, int]] = []
    try:
        for records in polls:
            async with conn.transaction():
                applied = await writers.apply(conn, records)
                assert applied.rejected == []
                tombstones += applied.tombstones
        left = await conn.fetchval("SELECT count(*) FROM bodies WHERE ref = $1", uuid.UUID(flex.id))  # fmt: skip
        return tombstones, left
    finally:
        await conn.close()


@pytest.mark.parametrize("same_poll", [False, True])
def test_a_result_met_after_its_erasure_is_dropped_and_tombstoned_again(dsn: str, same_poll: bool) -> None:  # fmt: skip
    flex = Flex()
    polls = [[flex.created()], [flex.erased(), flex.result()]]
    if not same_poll:
        polls = [[flex.created()], [flex.erased()], [flex.result()]]
    assert run(_project(dsn, flex, *polls)) == ([(flex.key, 0)], 0)


def test_a_result_the_erasure_meets_stored_is_tombstoned_again(dsn: str) -> None:
    # The commands agent tombstoned the key, the call's result landed after that tombstone, and
    # the projector read the bodies topic ahead of the requests topic: the result is the key's
    # latest record, which compaction would keep for good.
    flex = Flex()
    tombstone = consumer_record(topics.BODIES.name, 0, flex.key, None)
    polls = [[flex.created()], [tombstone, flex.result()], [flex.erased()]]
    where = bodies.partition_for(flex.id, topics.BODIES.partitions)  # the body's, as written
    assert run(_project(dsn, flex, *polls)) == ([(flex.key, where)], 0)
