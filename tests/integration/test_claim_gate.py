"""The claim gate and the executor against the real broker, with two gate and two executor
processes: capacity, fairness, urgency, model filters, retries, and recovery from kill -9."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import msgspec
import openai
import pytest
from openai import OpenAI

from compose import stack
from compose.services import Services
from schemas import ids
from tests.integration.conftest import (
    barrier,
    chat_line,
    content_lines,
    eventually,
    jsonl,
    run,
    upstream_stats,
    wait_for_batch,
)

pytestmark = pytest.mark.integration


def submit(client: OpenAI, lines: list[dict[str, Any]], window: str = "24h") -> Any:
    uploaded = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window=window,  # type: ignore[arg-type]
    )


def counts(client: OpenAI, batch_id: str) -> tuple[int, int]:
    c = client.batches.retrieve(batch_id).request_counts
    assert c is not None
    return c.completed, c.failed


def calls(services: Services, batch_id: str, lines: int) -> list[dict[str, Any]]:
    wanted = {ids.request_id(batch_id, i) for i in range(lines)}
    return [c for c in upstream_stats(services)["calls"] if c["request_id"] in wanted]


def test_small_user_is_not_starved_and_capacity_is_never_exceeded(
    client_for: Callable[[str], OpenAI], services: Services
) -> None:
    alice, bob = client_for("alice-big"), client_for("bob-small")
    big = submit(alice, [chat_line(f"a{i}", latency_ms=50) for i in range(1000)])
    wait_for_batch(alice, big.id, {"in_progress"})
    eventually(lambda: counts(alice, big.id)[0] >= 20, "alice's batch to be well under way")
    small = submit(bob, [chat_line(f"b{i}", latency_ms=20) for i in range(10)])
    done = wait_for_batch(bob, small.id, timeout_s=60)
    assert done.status == "completed"
    # Bob's 10 requests went out as soon as capacity freed, not after Alice's thousand: read
    # from the upstream's own arrival times, so projection and polling lag do not count.
    bob_last = max(c["at"] for c in calls(services, small.id, 10))
    alice_before = sum(c["at"] < bob_last for c in calls(services, big.id, 1000))
    assert alice_before < 700, f"bob waited for {alice_before} of alice's requests"
    assert wait_for_batch(alice, big.id, timeout_s=240).status == "completed"
    # chat-a's limit is 4; the fake upstream recorded the most it ever saw at once.
    assert upstream_stats(services)["models"]["chat-a"]["max_in_flight"] <= 4


def test_an_urgent_batch_overtakes_a_running_one(client_for: Callable[[str], OpenAI]) -> None:
    client = client_for("carla")
    relaxed = submit(client, [chat_line(f"r{i}", latency_ms=20) for i in range(400)], window="24h")
    wait_for_batch(client, relaxed.id, {"in_progress"})
    urgent = submit(client, [chat_line(f"u{i}", latency_ms=20) for i in range(20)], window="1h")
    assert wait_for_batch(client, urgent.id, timeout_s=60).status == "completed"
    relaxed_done, _ = counts(client, relaxed.id)
    assert relaxed_done < 300, "the 1h batch waited behind the 24h one"
    wait_for_batch(client, relaxed.id, timeout_s=240)


def set_state(services: Services, model: str, state: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "cannonade.cli", "models", "set-state", model, state],
        env=services.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0 or state not in ("live", "coming", "absent", "leaving"), (
        result.stderr
    )
    return result.stderr


def model_state(stack_info: stack.StackInfo, model: str) -> str | None:
    async def latest() -> str | None:
        conn = await asyncpg.connect(stack_info.database_url)
        try:
            return await conn.fetchval(  # type: ignore[no-any-return]
                "SELECT state FROM model_filters WHERE model = $1"
                " ORDER BY created_at DESC, id DESC LIMIT 1",
                model,
            )
        finally:
            await conn.close()

    return run(latest())  # type: ignore[no-any-return]


def test_a_coming_model_trickles_then_live_releases(
    client_for: Callable[[str], OpenAI], services: Services, stack_info: stack.StackInfo
) -> None:
    client = client_for("dana")
    set_state(services, "chat-c", "coming")
    eventually(lambda: model_state(stack_info, "chat-c") == "coming", "the model filter")
    batch = submit(client, [chat_line(f"c{i}", model="chat-c") for i in range(30)])
    wait_for_batch(client, batch.id, {"in_progress"})
    eventually(lambda: counts(client, batch.id) != (0, 0), "the bucket's one row")
    barrier(client, "chat-a")  # the gate has decided again since: nothing more for chat-c
    # 24 h window: far from its ramp, so only the leaky bucket's one row per 24 min went out.
    assert counts(client, batch.id) == (1, 0)
    assert len(calls(services, batch.id, 30)) == 1
    # Capacity admission sees the held-back work: 29 rows due within 24 h, none within 1 h.
    result = subprocess.run(
        [sys.executable, "-m", "cannonade.cli", "pending-counts", "--window", "1h::3600",
         "--window", "24h::90000", "--state", "pending", "--model", "chat-c"],
        env=services.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert msgspec.json.decode(result.stdout) == {"chat-c": {"1h": 0, "24h": 29}}, result.stderr
    set_state(services, "chat-c", "live")
    done = wait_for_batch(client, batch.id, timeout_s=60)
    assert (done.status, done.request_counts.completed) == ("completed", 30)


def test_an_unknown_model_state_is_rejected(services: Services) -> None:
    assert "'sleepy' is not one of 'live', 'coming'" in set_state(services, "chat-c", "sleepy")


def test_5xx_is_retried_with_backoff_then_fails_and_400_fails_at_once(
    client_for: Callable[[str], OpenAI], services: Services
) -> None:
    client = client_for("erik")
    lines = [
        chat_line("flaky", model="chat-d", status=500),
        chat_line("limited", model="chat-d", status=429),
        chat_line("bad", model="chat-d", status=400),
        chat_line("recovers", model="chat-d", fail_times=2, fail_status=503),
    ]
    batch = submit(client, lines)
    done = wait_for_batch(client, batch.id, timeout_s=90)
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == (
        "completed",
        1,
        3,
    )

    errors = {
        line["custom_id"]: msgspec.json.decode(line["error"]["message"])
        for line in content_lines(client, done.error_file_id)
    }
    assert (
        errors["flaky"]["type"] == "RetriableHttpStatus"
        and errors["flaky"]["details"]["status"] == 500
    )
    assert (
        errors["limited"]["type"] == "RetriableHttpStatus"
        and errors["limited"]["details"]["status"] == 429
    )
    assert errors["bad"]["type"] == "NonRetriableHttpStatus"

    by_line = {
        i: sorted(
            c["at"]
            for c in calls(services, batch.id, 4)
            if c["request_id"] == ids.request_id(batch.id, i)
        )
        for i in range(4)
    }
    # max_retries 3 ⇒ 4 calls, spaced by the spec's backoff: 1 s, 2 s, 4 s.
    for line in (0, 1):
        at = by_line[line]
        assert len(at) == 4
        gaps = [b - a for a, b in zip(at, at[1:], strict=False)]
        for gap, backoff in zip(gaps, (1, 2, 4), strict=True):
            assert backoff - 0.05 <= gap <= backoff + 2.5, gaps
    assert len(by_line[2]) == 1  # 400: no retry
    assert len(by_line[3]) == 3  # failed twice, then succeeded


def test_killing_an_executor_mid_batch_ends_every_request_exactly_once(
    client_for: Callable[[str], OpenAI], services: Services
) -> None:
    client = client_for("fay")
    # chat-b runs 16 at a time: 300 lines of 300 ms take ~6 s, so the kill lands mid-batch.
    batch = submit(client, [chat_line(f"x{i}", model="chat-b", latency_ms=300) for i in range(300)])
    wait_for_batch(client, batch.id, {"in_progress"})
    eventually(lambda: counts(client, batch.id)[0] >= 16, "the batch to be under way")
    restarts = services.kill("executor-1", signal.SIGKILL)
    assert counts(client, batch.id)[0] < 250
    done = wait_for_batch(client, batch.id, timeout_s=180)
    services.wait_restarted("executor-1", restarts)

    errors = [line["error"]["message"] for line in content_lines(client, done.error_file_id)]
    assert (done.status, done.request_counts.completed) == ("completed", 300), errors[:3]
    output = content_lines(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(f"x{i}" for i in range(300))
    sent: dict[str, int] = {}
    for call in calls(services, batch.id, 300):
        sent[call["request_id"]] = sent.get(call["request_id"], 0) + 1
    # A request the dead executor had in flight is sent again at most once more, and the
    # model's limit held throughout the recovery.
    assert max(sent.values()) <= 2
    assert upstream_stats(services)["models"]["chat-b"]["max_in_flight"] <= 16


def test_executors_are_visible_as_daemon_records(services: Services) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cannonade.cli", "workers"],
        env=services.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    running = [line for line in result.stdout.splitlines() if " running " in line]
    assert len(running) >= 2, result.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "cannonade.cli", "workers", "--json"],
        env=services.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert as_json.returncode == 0, as_json.stderr
    daemons = [json.loads(line) for line in as_json.stdout.splitlines()]
    running_now = [d for d in daemons if d["status"] == "running"]
    assert len(running_now) >= 2 and all(isinstance(d["last_heartbeat"], int) for d in running_now)


def test_a_batch_past_its_deadline_shows_expired_and_keeps_its_results(
    client_for: Callable[[str], OpenAI], services: Services
) -> None:
    client = client_for("gus")
    # chat-a runs 4 at a time; at 2 s a line, 40 lines need ~20 s and the window is 15 s.
    batch = submit(client, [chat_line(f"e{i}", latency_ms=2000) for i in range(40)], window="15s")
    done = wait_for_batch(client, batch.id, {"expired"}, timeout_s=60)
    deadline_passed = time.time()
    assert done.expired_at == done.expires_at and done.expires_at <= deadline_passed

    # The rows in flight at the deadline finish; nothing more is sent.
    def ended() -> Any:
        found = client.batches.retrieve(batch.id)
        c = found.request_counts
        return found if c is not None and c.completed + c.failed == 40 else None

    final = eventually(ended, "every row of the expired batch to end")
    sent = len(calls(services, batch.id, 40))
    barrier(client, "chat-a")
    assert len(calls(services, batch.id, 40)) == sent
    c = final.request_counts
    assert final.status == "expired" and c.total == 40 and 0 < c.completed < 40
    assert c.completed + c.failed == 40
    errors = [
        msgspec.json.decode(line["error"]["message"])
        for line in content_lines(client, final.error_file_id)
    ]
    assert errors and {e["type"] for e in errors} == {"BatchTerminated"}
    assert len(content_lines(client, final.output_file_id)) == c.completed
    listed = client.batches.list(extra_query={"status": "expired"}).data
    assert batch.id in {b.id for b in listed}
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)
