"""Whatever a client sends, the API answers a 2xx or a 4xx OpenAI error envelope, never a 5xx,
and a rejected upload leaves nothing behind (property-based, against the running stack)."""

from __future__ import annotations

import json
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import OpenAI

from compose import stack
from compose.services import Services
from projections.api.auth import create_key
from schemas import bodies, topics
from schemas import ids as id_rules
from tests.integration.conftest import caught_up, chat_line, jsonl, read_topic, run

pytestmark = pytest.mark.integration

USER = "quinn"
PROPERTY = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Text a client might put anywhere: NUL and other control characters, escapes, huge numbers,
# LIKE wildcards, unicode.
nasty_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "\x00", "a\x00b", "%", "_", "\\", "%_\\", "99999999999999999999", "-1", "1e9",
            "9223372036854775808", "NaN", "\u202e", "🦀", "' OR 1=1 --", "", " ", "24h\x00",
        ]
    ),
)  # fmt: skip


@pytest.fixture(scope="module")
def http(services: Services, stack_info: stack.StackInfo) -> Iterator[httpx.Client]:
    key = run(create_key(stack_info.kafka_bootstrap, stack_info.database_url, USER))
    with httpx.Client(
        base_url=f"{services.api_url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as client:
        yield client


@pytest.fixture(scope="module")
def ids(http: httpx.Client, client_for: Callable[[str], OpenAI]) -> dict[str, str]:
    """A real file and batch of the user, so by-id routes are exercised past the lookup."""
    client = OpenAI(base_url=str(http.base_url), api_key=http.headers["Authorization"][7:])
    uploaded = client.files.create(file=("p.jsonl", jsonl([chat_line("p1", model="chat-b")])), purpose="batch")  # fmt: skip
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return {"file": uploaded.id, "batch": batch.id, "output": str(batch.output_file_id)}


def assert_not_server_error(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str)
        assert set(error) == {"message", "type", "param", "code"}


@PROPERTY
@given(
    route=st.sampled_from(["files", "file", "content", "output", "batches", "batch"]),
    params=st.dictionaries(
        st.sampled_from(
            ["limit", "skip", "after", "order", "purpose", "search", "status",
             "completion_window", "created_after", "created_before"]
        ),
        nasty_text,
        max_size=4,
    ),
)  # fmt: skip
def test_any_query_parameter_gets_an_answer_or_a_clear_error(
    http: httpx.Client, ids: dict[str, str], route: str, params: dict[str, str]
) -> None:
    path = {
        "files": "/files",
        "file": f"/files/{ids['file']}",
        "content": f"/files/{ids['file']}/content",
        "output": f"/files/{ids['output']}/content",
        "batches": "/batches",
        "batch": f"/batches/{ids['batch']}",
    }[route]
    assert_not_server_error(http.get(path, params=params))


@PROPERTY
@given(segment=nasty_text)
def test_any_id_in_a_path_gets_an_answer_or_a_clear_error(http: httpx.Client, segment: str) -> None:
    quoted = urllib.parse.quote(segment, safe="")
    if not quoted or quoted in (".", ".."):
        return
    for path in ("/files/{}", "/files/{}/content", "/batches/{}"):
        assert_not_server_error(http.get(path.format(quoted)))


line_values = st.one_of(
    st.none(), st.booleans(), st.integers(), nasty_text,
    st.dictionaries(nasty_text, st.one_of(nasty_text, st.integers()), max_size=3),
)  # fmt: skip


@st.composite
def upload_lines(draw: st.DrawFn) -> bytes:
    """Lines that are sometimes valid and often subtly not."""
    lines = []
    for n in range(draw(st.integers(1, 4))):
        line: dict[str, Any] = chat_line(f"id{n}", model="chat-b")
        for field in draw(st.lists(st.sampled_from(["custom_id", "method", "url", "body"]), max_size=2)):  # fmt: skip
            line[field] = draw(line_values)
        if draw(st.booleans()):
            line["body"] = {**line.get("body", {}), "model": draw(st.one_of(st.just("chat-b"), nasty_text))} if isinstance(line.get("body"), dict) else line.get("body")  # fmt: skip
        lines.append(json.dumps(line))
    raw = "\n".join(lines).encode()
    if draw(st.booleans()):
        raw = draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff", b"\x00", b"{", b"\n\n"])) + raw
    return raw


async def _files_of(dsn: str, user: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM files WHERE owner = $1", user))
    finally:
        await conn.close()


@PROPERTY
@given(
    data=upload_lines(),
    filename=nasty_text,
    purpose=st.one_of(st.none(), st.just("batch"), nasty_text),
)
def test_any_upload_is_accepted_or_rejected_cleanly_and_a_rejected_one_leaves_nothing(
    http: httpx.Client, stack_info: stack.StackInfo, data: bytes, filename: str, purpose: str | None
) -> None:
    before = run(_files_of(stack_info.database_url, USER))
    form = {} if purpose is None else {"purpose": purpose}
    response = http.post("/files", files={"file": (filename or "f.jsonl", data)}, data=form)
    assert_not_server_error(response)
    after = run(_files_of(stack_info.database_url, USER))
    assert after == before + (1 if response.status_code < 300 else 0)


@PROPERTY
@given(
    body=st.dictionaries(
        st.sampled_from(["input_file_id", "endpoint", "completion_window", "metadata", "x"]),
        line_values,
        max_size=5,
    )
)
def test_any_batch_creation_body_gets_an_answer_or_a_clear_error(
    http: httpx.Client, ids: dict[str, str], body: dict[str, Any]
) -> None:
    if "input_file_id" not in body:
        body["input_file_id"] = ids["file"]
    assert_not_server_error(http.post("/batches", json=body))
    assert_not_server_error(http.post(f"/batches/{uuid.uuid4()}/cancel"))


async def _stored_of(stack_info: stack.StackInfo, file_id: str) -> tuple[dict[str, bool], int, int]:  # fmt: skip
    """For each chunk key of ``file_id`` on the bodies topic, whether its last record is a
    tombstone; and the file's chunk rows and template rows in the read model once the
    projector caught up."""
    prefix = f"{bodies.CHUNK}:{file_id}:".encode()
    last: dict[str, bool] = {}
    for record in await read_topic(stack_info.kafka_bootstrap, topics.BODIES):
        if record.key is not None and record.key.startswith(prefix):
            last[record.key.decode()] = record.value is None
    await caught_up(stack_info.database_url, stack_info.kafka_bootstrap, "projector")
    conn = await asyncpg.connect(stack_info.database_url)
    try:
        chunks = await conn.fetchval(
            "SELECT count(*) FROM template_chunks WHERE starts_with(body_key, $1)",
            prefix.decode(),
        )
        templates = await conn.fetchval(
            "SELECT count(*) FROM request_templates WHERE file_id = $1", uuid.UUID(file_id)
        )
    finally:
        await conn.close()
    return last, int(chunks), int(templates)


def test_a_large_upload_failing_on_its_last_line_leaves_nothing_and_a_retry_makes_the_file(
    http: httpx.Client, stack_info: stack.StackInfo
) -> None:
    # Parts go out while the file is parsed (a few behind), so a late bad line in a file of
    # nine chunks finds some already appended: they are voided, and the same key then makes
    # the file from the corrected upload alone.
    lines = [json.dumps(chat_line(f"big{n}", model="chat-b", pad="x" * 200)) for n in range(15000)]
    bad = json.dumps(chat_line("last", model="no-such-model"))
    key = str(uuid.uuid4())

    def upload(content: list[str]) -> httpx.Response:
        return http.post(
            "/files",
            files={"file": ("big.jsonl", "\n".join(content).encode())},
            data={"purpose": "batch"},
            headers={"Idempotency-Key": key},
        )

    response = upload([*lines, bad])
    assert response.status_code == 403, response.text
    assert "Line 15001: Model 'no-such-model'" in response.json()["error"]["message"]
    file_id = id_rules.file_id_for(USER, key)
    tombstoned, chunks, templates = run(_stored_of(stack_info, file_id))
    assert tombstoned and all(tombstoned.values()), tombstoned
    assert (chunks, templates) == (0, 0)
    assert http.get(f"/files/{file_id}").status_code == 404

    fixed = lines[:9000]
    response = upload(fixed)
    assert response.status_code == 201, response.text
    content = http.get(f"/files/{file_id}/content")
    assert [json.loads(line)["custom_id"] for line in content.text.splitlines()] == [
        json.loads(line)["custom_id"] for line in fixed
    ]
