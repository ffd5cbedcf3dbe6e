"""A batch's deletion as the commands agent applies it (streams/population.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.commands import DeleteBatch
from schemas.events import BatchDeleted
from streams import population

NOW = datetime(2026, 1, 1, tzinfo=UTC)
BATCH = "1f0e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"


def delete(erase: bool) -> DeleteBatch:
    return DeleteBatch(command_id="d", issued_at=NOW, batch_id=BATCH, erase=erase)


def test_an_erasure_clears_a_batch_its_owner_had_deleted_and_a_second_delete_does_nothing() -> None:  # fmt: skip
    record = population.BatchRecord(populated=True, models=["m"])
    first = [o.value for o in population.delete_batch(record, delete(False), NOW)]
    [deleted] = [e for e in first if isinstance(e, BatchDeleted)]
    assert not deleted.erase
    assert population.delete_batch(record, delete(False), NOW) == []
    [erased] = [o.value for o in population.delete_batch(record, delete(True), NOW)]
    assert isinstance(erased, BatchDeleted) and erased.erase
    assert erased.event_id != deleted.event_id  # an event of its own
