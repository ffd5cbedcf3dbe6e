"""The exported JSON Schemas are the contract outside producers and consumers build against,
and the decoders enforce exactly that contract."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import msgspec
import pytest

from schemas import codec, export
from schemas.bodies import BodyRef, encode_chunk
from schemas.commands import AppendFileLines, CreateBatch, FileLine
from schemas.events import TemplateMeta, TemplatesAppended
from schemas.excluded import Decoder
from schemas.types import Text

NOW = datetime(2026, 1, 1, tzinfo=UTC)
FILE = "7b0f1c2e-3a4d-4e5f-8a9b-0c1d2e3f4a5b"
BATCH = "1f0e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"


def test_checked_in_json_schemas_are_current() -> None:
    rendered = export.render()
    on_disk = {p.name: p.read_bytes() for p in export.OUT.glob("*.json")}
    stale = sorted(n for n in rendered if on_disk.get(n) != rendered[n])
    extra = sorted(set(on_disk) - set(rendered))
    assert not stale and not extra, f"run `python -m schemas.export`: stale {stale}, extra {extra}"


def test_commands_round_trip_with_their_type_tag_and_version() -> None:
    cmds = [
        CreateBatch(command_id="c1", issued_at=NOW, batch_id=BATCH, owner="u", input_file_id=FILE, endpoint="/v1/chat/completions", completion_window="24h"),
        AppendFileLines(command_id="c2", issued_at=NOW, file_id=FILE, upload_id=BATCH, first_line=0, body_key="tplc:x", body=BodyRef(0, 7), lines=[FileLine("x", "POST", "/v1/embeddings", "m", 2)]),
    ]  # fmt: skip
    for cmd in cmds:
        raw = codec.encode(cmd)
        doc = msgspec.json.decode(raw)
        assert doc["type"] == type(cmd).__name__ and doc["schema_version"] == 1
        assert codec.commands.decode(raw) == cmd


def _create_batch(**fields: object) -> bytes:
    doc: dict[str, object] = {
        "type": "CreateBatch", "command_id": "c", "issued_at": "2026-01-01T00:00:00Z",
        "batch_id": BATCH, "owner": "alice", "input_file_id": FILE,
        "endpoint": "/v1/chat/completions", "completion_window": "24h",
    }  # fmt: skip
    return msgspec.json.encode(doc | fields)


def test_a_well_formed_command_decodes() -> None:
    assert codec.commands.decode(_create_batch()).batch_id == BATCH


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"batch_id": "not-a-uuid"}, "batch_id"),
        ({"input_file_id": FILE.upper()}, "input_file_id"),
        ({"issued_at": "2026-01-01T00:00:00"}, "issued_at"),  # no time zone
        ({"completion_window": "7 days"}, "completion_window"),
        ({"owner": "ali\x00ce"}, "owner"),
        ({"metadata": {"k": "v\x00"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"unexpected": 1}, "unexpected"),
    ],
)
def test_what_breaks_the_published_contract_is_refused_with_the_field_named(
    fields: dict[str, object], named: str
) -> None:
    with pytest.raises(codec.DecodeErrors, match=named):
        codec.commands.decode(_create_batch(**fields))


def _append(custom_id: str) -> bytes:
    line = FileLine("ok", "POST", "/v1/chat/completions", "m", 2)
    cmd = AppendFileLines(command_id="c", issued_at=NOW, file_id=FILE, upload_id=BATCH, first_line=0, body_key="tplc:x", body=BodyRef(0, 7), lines=[line, line])  # fmt: skip
    doc = msgspec.json.decode(codec.encode(cmd))
    doc["lines"][1][0] = custom_id
    return msgspec.json.encode(doc)


def test_a_body_size_the_read_model_cannot_hold_is_refused_with_the_line_named() -> None:
    doc = msgspec.json.decode(_append("fine"))
    doc["lines"][1][4] = 2**31  # the templates' int column tops out one below
    with pytest.raises(codec.DecodeErrors, match=r"lines\[1\]"):
        codec.commands.decode(msgspec.json.encode(doc))


@pytest.mark.parametrize(
    ("first_line", "named"), [(2**31, "first_line"), (2**31 - 1, "lines past")]
)
def test_an_appended_line_number_the_read_model_cannot_hold_is_refused(first_line: int, named: str) -> None:  # fmt: skip
    # The projector COPYs template rows, where a number its int column cannot hold would fail
    # every retry of the poll instead of dead-lettering the one record.
    meta = TemplateMeta("ok", "POST", "/v1/chat/completions", "m", 2)
    event = TemplatesAppended(event_id="e", occurred_at=NOW, file_id=FILE, first_line=0, body_key="tplc:x", body=BodyRef(0, 7), templates=[meta, meta])  # fmt: skip
    doc = msgspec.json.decode(codec.encode(event))
    doc["first_line"] = first_line
    with pytest.raises(codec.DecodeErrors, match=named):
        codec.file_events.decode(msgspec.json.encode(doc))


@pytest.mark.parametrize("custom_id", ["a\nb", "trailing\n", "a\x00", "a\x1f", "del\x7f"])
def test_a_control_character_in_a_custom_id_is_refused_with_the_line_named(custom_id: str) -> None:
    with pytest.raises(codec.DecodeErrors, match=r"\$\.lines\[1\]\.custom_id"):
        codec.commands.decode(_append(custom_id))


@pytest.mark.parametrize("custom_id", ["tab\tok", "back\\slash", "\\u0000 as text", "é🦀"])
def test_text_that_only_looks_escaped_is_accepted_as_it_is(custom_id: str) -> None:
    decoded = codec.commands.decode(_append(custom_id))
    assert isinstance(decoded, AppendFileLines) and decoded.lines[1].custom_id == custom_id


def test_the_published_schema_states_formats_and_forbids_unknown_fields() -> None:
    schema = msgspec.json.decode(export.render()["commands.schema.json"])
    create = schema["$defs"]["CreateBatch"]
    assert create["properties"]["batch_id"]["format"] == "uuid"
    assert "pattern" in create["properties"]["batch_id"]
    assert create["properties"]["issued_at"]["format"] == "date-time"
    assert create["properties"]["owner"]["pattern"] == "^[^\\x00]*$"  # enforced per message
    assert create["additionalProperties"] is False


def test_a_command_missing_a_field_is_rejected_with_the_field_named() -> None:
    raw = b'{"type":"CancelBatch","command_id":"c","issued_at":"2026-01-01T00:00:00Z"}'
    with pytest.raises(codec.DecodeErrors, match="batch_id"):
        codec.commands.decode(raw)


def test_a_template_chunk_embeds_bodies_without_escaping_them() -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":"say \\"hi\\""}]}'
    chunk = encode_chunk([("a", body), (None, b"{}")])
    assert len(chunk) < len(body) + 40  # each body takes its own size, quotes included
    decoded = msgspec.json.decode(chunk)
    assert decoded["lines"][0] == ["a", msgspec.json.decode(body)]
    assert decoded["lines"][1] == [None, {}]


class _Shapes(msgspec.Struct):
    pair: tuple[int, Text] | None = None
    names: dict[str, list[Text]] = {}
    either: Text | int = 0


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"pair": [1, "a\u0000"]}, "$.pair[1]"),
        ({"names": {"k": ["ok", "b\u0000"]}}, "$.names['k'][1]"),
        ({"either": "c\u0000"}, "$.either"),
    ],
)
def test_excluded_characters_are_found_in_every_shape_a_contract_may_take(
    doc: dict[str, object], path: str
) -> None:
    raw = msgspec.json.encode(doc)  # NUL goes out as the escape \u0000
    with pytest.raises(msgspec.ValidationError, match=re.escape(f"at `{path}`")):
        Decoder(_Shapes).decode(raw)
    assert Decoder(_Shapes).decode(b'{"pair": [1, "fine"], "either": 3}').pair == (1, "fine")
