"""A batch's deletion and retry as the commands agent applies them (streams/population.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.commands import DeleteBatch, RetryBatch, RowRanges
from schemas.errors import ApiError
from schemas.events import BatchDeleted, BatchFacts, ChunkRef, LineRange
from streams import population

NOW = datetime(2026, 1, 1, tzinfo=UTC)
BATCH = "1f0e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
FACTS = BatchFacts(
    batch_id=BATCH, file_id=BATCH, owner="u", created_at=NOW, deadline=NOW + timedelta(days=1),
    window_class="24h", window_s=86400, path="/v1/chat/completions",
)  # fmt: skip


def delete(erase: bool) -> DeleteBatch:
    return DeleteBatch(command_id="d", issued_at=NOW, batch_id=BATCH, erase=erase)


def test_an_erasure_clears_a_batch_its_owner_had_deleted_and_a_second_delete_does_nothing() -> None:  # fmt: skip
    record = population.BatchRecord(populated=True, models=["m"])
    first = [o.value for o in population.delete_batch(record, delete(False), (0, 1), NOW)]
    [deleted] = [e for e in first if isinstance(e, BatchDeleted)]
    assert not deleted.erase
    assert population.delete_batch(record, delete(False), (0, 1), NOW) == []
    [erased] = [o.value for o in population.delete_batch(record, delete(True), (0, 2), NOW)]
    assert isinstance(erased, BatchDeleted) and erased.erase
    assert erased.event_id != deleted.event_id  # an event of its own


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (RowRanges("other", [LineRange(0, 1)]), "no rows on model 'other'"),
        (RowRanges("m", [LineRange(0, 2_000_000)]), "are not lines of batch"),
        (RowRanges("m", [LineRange(3, 3)]), "are not lines of batch"),
    ],
)
def test_a_retry_naming_rows_the_batch_does_not_have_is_refused(rows: RowRanges, message: str) -> None:  # fmt: skip
    record = population.BatchRecord(populated=True, models=["m"], facts=FACTS, chunks=[ChunkRef(0, 4, 1, 7)])  # fmt: skip
    cmd = RetryBatch(command_id="r", issued_at=NOW, batch_id=BATCH, retry_version=0, scope="batch", failed=[rows])  # fmt: skip
    with pytest.raises(ApiError, match=message) as info:
        population.retry(record, cmd, (0, 1), NOW)
    assert info.value.status == 400 and record.retry_version == 0
