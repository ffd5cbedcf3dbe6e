"""The exported JSON Schemas are the contract outside consumers build against."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from schemas import codec, export
from schemas.commands import AppendFileLines, CreateBatch, FileLine


def test_checked_in_json_schemas_are_current() -> None:
    rendered = export.render()
    on_disk = {p.name: p.read_bytes() for p in export.OUT.glob("*.json")}
    stale = sorted(n for n in rendered if on_disk.get(n) != rendered[n])
    extra = sorted(set(on_disk) - set(rendered))
    assert not stale and not extra, f"run `python -m schemas.export`: stale {stale}, extra {extra}"


def test_commands_round_trip_with_their_type_tag_and_version() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    cmds = [
        CreateBatch(command_id="c1", issued_at=now, batch_id="b", owner="u", input_file_id="f", endpoint="/v1/chat/completions", completion_window="24h"),
        AppendFileLines(command_id="c2", issued_at=now, file_id="f", first_line=0, lines=[FileLine("x", "POST", "/v1/embeddings", "m", "{}")]),
    ]  # fmt: skip
    for cmd in cmds:
        raw = codec.encode(cmd)
        doc = msgspec.json.decode(raw)
        assert doc["type"] == type(cmd).__name__ and doc["schema_version"] == 1
        assert codec.commands.decode(raw) == cmd


def test_a_command_missing_a_field_is_rejected_with_the_field_named() -> None:
    raw = b'{"type":"CancelBatch","command_id":"c","issued_at":"2026-01-01T00:00:00Z"}'
    with pytest.raises(codec.DecodeErrors, match="batch_id"):
        codec.commands.decode(raw)
