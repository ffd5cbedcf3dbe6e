"""A file's parts as the commands agent applies them: in order, once each in effect, and the
file created only from every line its header declares."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from schemas.bodies import BodyRef
from schemas.commands import AbandonUpload, AppendFileLines, CreateFile, FileLine
from schemas.errors import ApiError
from schemas.events import FileUploaded, TemplatesAppended, UploadAbandoned
from streams import population
from streams.population import FileRecord

NOW = datetime(2026, 1, 1, tzinfo=UTC)
FILE = "7b0f1c2e-3a4d-4e5f-8a9b-0c1d2e3f4a5b"
UPLOAD = "1f0e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"


def append(first: int, count: int, offset: int, models: str = "") -> AppendFileLines:
    """Lines ``first…`` on model ``gpt``, or on the models named one letter per line."""
    lines = [
        FileLine(
            f"c{first + i}",
            "POST",
            f"/v1/{models[i] if models else 'chat'}",
            models[i] if models else "gpt",
            10,
        )
        for i in range(count)
    ]
    return AppendFileLines(
        command_id=f"a{first}", issued_at=NOW, file_id=FILE, upload_id=UPLOAD, first_line=first,
        body_key=f"tplc:{first}", body=BodyRef(0, offset), lines=lines,
    )  # fmt: skip


def create(count: int) -> CreateFile:
    return CreateFile(
        command_id="f", issued_at=NOW, file_id=FILE, upload_id=UPLOAD, owner="alice",
        filename="in.jsonl", purpose="batch", bytes=1, line_count=count, expires_at=None,
    )  # fmt: skip


def abandon() -> AbandonUpload:
    return AbandonUpload(command_id="x", issued_at=NOW, file_id=FILE, upload_id=UPLOAD)


def saved(record: FileRecord) -> bytes:
    return msgspec.msgpack.encode(record)


def test_parts_in_order_make_a_file_of_every_line() -> None:
    record = FileRecord()
    events = population.append_lines(record, append(0, 2, 7), NOW)
    events += population.append_lines(record, append(2, 3, 8), NOW)
    appended = [o.value for o in events]
    assert all(isinstance(e, TemplatesAppended) for e in appended)
    assert [len(e.templates) for e in appended if isinstance(e, TemplatesAppended)] == [2, 3]
    [uploaded] = population.create_file(record, create(5), NOW)
    assert isinstance(uploaded.value, FileUploaded) and uploaded.value.template_count == 5


def test_a_part_out_of_order_is_refused_and_changes_nothing() -> None:
    record = FileRecord()
    population.append_lines(record, append(0, 2, 7), NOW)
    before = saved(record)
    with pytest.raises(ApiError, match="must arrive in order: expected line 2, got 3"):
        population.append_lines(record, append(3, 1, 8), NOW)
    assert saved(record) == before


def test_a_part_applied_again_gives_the_same_event_and_leaves_the_record() -> None:
    # The agent saves the record without awaiting the part's event: a replay after a crash
    # must bring the event back rather than refuse the part as out of order.
    record = FileRecord()
    [first] = population.append_lines(record, append(0, 2, 7), NOW)
    population.append_lines(record, append(2, 3, 8), NOW)
    before = saved(record)
    assert population.append_lines(record, append(0, 2, 7), NOW) == [first]
    assert saved(record) == before
    [uploaded] = population.create_file(record, create(5), NOW)
    assert isinstance(uploaded.value, FileUploaded)


def test_a_different_part_at_a_line_already_appended_is_refused() -> None:
    record = FileRecord()
    population.append_lines(record, append(0, 2, 7), NOW)
    with pytest.raises(ApiError, match="must arrive in order"):
        population.append_lines(record, append(0, 2, 9), NOW)  # another chunk record


def test_a_file_declaring_more_lines_than_its_parts_is_refused() -> None:
    record = FileRecord()
    population.append_lines(record, append(0, 2, 7), NOW)
    with pytest.raises(ApiError, match="declares 3 lines but upload .* appended 2"):
        population.create_file(record, create(3), NOW)


def test_the_manifest_knows_each_lines_model_and_each_paths_first_line_across_parts() -> None:
    record = FileRecord()
    population.append_lines(record, append(0, 4, 7, models="aabb"), NOW)
    population.append_lines(record, append(4, 3, 8, models="bba"), NOW)
    population.create_file(record, create(7), NOW)
    assert record.manifest is not None
    runs = [(r.model, r.start, r.end) for r in record.manifest.models]
    assert runs == [("a", 0, 2), ("b", 2, 6), ("a", 6, 7)]
    assert record.manifest.urls == {"/v1/a": 0, "/v1/b": 2}


def test_an_abandoned_upload_voids_its_parts_and_leaves_nothing_to_keep() -> None:
    record = FileRecord()
    population.append_lines(record, append(0, 2, 7), NOW)
    [voided] = population.abandon_upload(record, abandon(), NOW)
    assert isinstance(voided.value, UploadAbandoned) and voided.value.upload_id == UPLOAD
    assert population.forgettable(record)
    # Voided, not merely paused: its lines cannot make a file any more.
    with pytest.raises(ApiError, match="declares 2 lines but upload .* appended 0"):
        population.create_file(record, create(2), NOW)


def test_an_abandon_applied_again_gives_its_event_again() -> None:
    record = FileRecord()
    population.append_lines(record, append(0, 2, 7), NOW)
    first = population.abandon_upload(record, abandon(), NOW)
    assert population.abandon_upload(record, abandon(), NOW) == first


def test_an_abandon_after_the_file_exists_changes_nothing() -> None:
    # The upload's CreateFile landed although its sender heard a failure: the lines are the
    # file's now.
    record = FileRecord()
    population.append_lines(record, append(0, 2, 7), NOW)
    population.create_file(record, create(2), NOW)
    before = saved(record)
    assert population.abandon_upload(record, abandon(), NOW) == []
    assert saved(record) == before and not population.forgettable(record)
