"""Metrics, health and logs of every process, on a stack of their own (the last test stops
PostgreSQL, and the counters must move by exactly what one batch does).

- every process answers ``/livez``, ``/readyz`` and ``/metrics``;
- a batch moves the per-model counters by exactly its lines, across two gate and two executor
  processes, and the histograms observe every call; no label value is an id;
- poison records are counted as dead letters where they were read;
- logs are JSON lines with level, time, role and the ids of the work;
- a process that uses PostgreSQL is not ready while it is down, and ready again after.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from openai import OpenAI

from compose import stack
from compose.services import ModelSpec, Sample, Services, metric_samples
from projections.api.auth import create_key
from projections.projector import TOPICS as PROJECTED
from schemas import topics
from tests.integration.conftest import (
    chat_line,
    eventually,
    http_get,
    jsonl,
    log_path,
    own_services,
    own_stack,
    wait_for_batch,
)

pytestmark = pytest.mark.integration

MODELS = {"obs-a": ModelSpec("chat", 4), "obs-b": ModelSpec("chat", 4)}
CONFIG = """
[executor]
backoff_ms = 100
max_backoff_ms = 200
heartbeat_interval_ms = 1000

[liveness]
stale_daemon_threshold_ms = 6000
"""
ENGINE = ("commands-0", "gate-0", "gate-1", "executor-0", "executor-1", "chains-0")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
SLOW_MS = 4000  # one call long enough to be seen in flight


@pytest.fixture(scope="module")
def obs_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack.StackInfo]:
    yield from own_stack(tmp_path_factory.mktemp("observability") / "stack")


@pytest.fixture(scope="module")
def obs_services(
    obs_stack: stack.StackInfo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Services]:
    dir_ = tmp_path_factory.mktemp("observability-services")
    yield from own_services(dir_, obs_stack, MODELS, extra_config=CONFIG)


@pytest.fixture(scope="module")
def client(obs_services: Services, obs_stack: stack.StackInfo) -> OpenAI:
    key = asyncio.run(create_key(obs_stack.kafka_bootstrap, obs_stack.database_url, "obs-user"))
    return OpenAI(base_url=f"{obs_services.api_url}/v1", api_key=key, max_retries=0, timeout=60)


def processes(services: Services) -> list[str]:
    """Every Cannonade process of the stack (not the fake upstream and tool server)."""
    return sorted(n for n in services.procs if n not in ("upstream", "tools"))


def scrape(services: Services, name: str) -> list[Sample]:
    status, body, content_type = http_get(f"{services.health_url(name)}/metrics")
    assert status == 200 and content_type.startswith("text/plain"), (name, status)
    return metric_samples(body.decode())


def scrape_all(services: Services) -> dict[str, list[Sample]]:
    return {name: scrape(services, name) for name in processes(services)}


def total(scraped: dict[str, list[Sample]], metric: str, **labels: str) -> float:
    """The sum over every process of ``metric``'s samples that carry ``labels``."""
    return sum(
        value
        for samples in scraped.values()
        for name, have, value in samples
        if name == metric and all(have.get(k) == v for k, v in labels.items())
    )


def ready(services: Services, name: str) -> tuple[int, dict[str, Any]]:
    status, body, _ = http_get(f"{services.health_url(name)}/readyz")
    return status, json.loads(body)


def test_every_process_is_live_ready_and_serves_metrics(obs_services: Services) -> None:
    names = processes(obs_services)
    assert {"api", "projector", "purge", *ENGINE} <= set(names)
    for name in names:
        status, body, _ = http_get(f"{obs_services.health_url(name)}/livez")
        assert status == 200, (name, body)
        status, verdict = ready(obs_services, name)
        assert status == 200 and verdict["status"] == "ready", (name, verdict)
        assert verdict["checks"] and set(verdict["checks"].values()) == {"ok"}, (name, verdict)
        role = name.split("-", 1)[0]
        assert total({name: scrape(obs_services, name)}, "cannonade_process_info", role=role) == 1
    # Each process says what its readiness is made of.
    assert set(ready(obs_services, "api")[1]["checks"]) == {"postgres", "kafka"}
    assert set(ready(obs_services, "projector")[1]["checks"]) == {"postgres", "projection"}
    assert set(ready(obs_services, "gate-0")[1]["checks"]) == {"kafka", "stream"}
    # The API's older probe still answers.
    assert http_get(f"{obs_services.api_url}/healthz")[0] == 200


def test_a_batch_moves_the_counters_by_model(obs_services: Services, client: OpenAI) -> None:
    lines = [chat_line(f"a-{n}", model="obs-a") for n in range(6)]
    lines += [chat_line(f"a-retry-{n}", model="obs-a", fail_times=1) for n in range(2)]
    lines += [chat_line(f"b-{n}", model="obs-b") for n in range(3)]
    lines += [chat_line("b-bad", model="obs-b", status=400)]
    lines += [chat_line("b-slow", model="obs-b", latency_ms=SLOW_MS)]
    before = scrape_all(obs_services)
    uploaded = client.files.create(file=("obs.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    # The slow call shows in flight on the gate that owns obs-b, under the batch's window.
    eventually(
        lambda: (
            total(
                scrape_all(obs_services),
                "cannonade_requests_in_flight",
                model="obs-b",
                window="24h",
            )
            >= 1
        ),  # fmt: skip
        "the slow call in flight",
    )
    done = wait_for_batch(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (12, 1)
    after = scrape_all(obs_services)

    def moved(metric: str, **labels: str) -> float:
        return total(after, metric, **labels) - total(before, metric, **labels)

    # Two of obs-a's lines fail once and run again: claimed twice, retried once each.
    assert moved("cannonade_requests_claimed_total", model="obs-a") == 10
    assert moved("cannonade_requests_completed_total", model="obs-a") == 8
    assert moved("cannonade_requests_retried_total", model="obs-a", reason="backoff") == 2
    assert moved("cannonade_requests_failed_total", model="obs-a") == 0
    assert moved("cannonade_requests_claimed_total", model="obs-b") == 5
    assert moved("cannonade_requests_completed_total", model="obs-b") == 4
    assert moved("cannonade_requests_failed_total", model="obs-b", error_type="NonRetriableHttpStatus") == 1  # fmt: skip
    assert moved("cannonade_requests_retried_total", model="obs-b") == 0
    upstream = "cannonade_upstream_responses_total"
    assert moved(upstream, model="obs-a", status="200") == 8
    assert moved(upstream, model="obs-a", status="500") == 2
    assert moved(upstream, model="obs-b", status="200") == 4
    assert moved(upstream, model="obs-b", status="400") == 1
    # Histograms: an observation per call, the slow one in the slowest buckets.
    for model, calls in (("obs-a", 10), ("obs-b", 5)):
        for histogram in ("cannonade_claim_latency_seconds", "cannonade_upstream_request_duration_seconds"):  # fmt: skip
            assert moved(f"{histogram}_count", model=model) == calls, (histogram, model)
            assert moved(f"{histogram}_bucket", model=model, le="+Inf") == calls
    # Every claim ran in a prefetch lane and left it once, its successor queued behind it or not.
    for model, claims in (("obs-a", 10), ("obs-b", 5)):
        assert moved("cannonade_lane_handoffs_total", model=model) == claims, model
    duration = "cannonade_upstream_request_duration_seconds_bucket"
    assert moved(duration, model="obs-b", le="2.5") == 4  # all but the slow call
    assert moved("cannonade_upstream_request_duration_seconds_sum", model="obs-b") >= SLOW_MS / 1000  # fmt: skip
    assert moved("cannonade_gate_decision_duration_seconds_count") > 0
    # The commands agent handled the upload and the batch.
    for command in ("CreateFile", "CreateBatch", "PopulateBatch"):
        assert moved("cannonade_commands_total", command=command) >= 1, command
    # The projector applied the lifecycle, and catches up.
    assert moved("cannonade_projector_records_total", topic=topics.REQUESTS.name) > 0
    assert moved("cannonade_projector_poll_duration_seconds_count") > 0
    lagging = {labels["topic"] for metric, labels, _ in after["projector"] if metric == "cannonade_projector_lag_records"}  # fmt: skip
    assert {topic.name for topic in PROJECTED} <= lagging
    lag_metric = "cannonade_projector_lag_records"
    eventually(
        lambda: (
            total({"p": scrape(obs_services, "projector")}, lag_metric, topic=topics.REQUESTS.name)
            == 0
        ),  # fmt: skip
        "the projector to catch up with the lifecycle",
    )
    # Once the batch ended, its model's queues read 0 rather than vanishing.
    drained = scrape_all(obs_services)
    for model in ("obs-a", "obs-b"):
        assert total(drained, "cannonade_requests_in_flight", model=model, window="24h") == 0
        assert total(drained, "cannonade_requests_pending", model=model, window="24h") == 0
    # API requests are labelled by route pattern, method and status.
    http = "cannonade_http_request_duration_seconds_count"
    assert moved(http, route="/v1/files", method="POST", status="201") == 1
    assert moved(http, route="/v1/batches", method="POST", status="201") == 1
    assert moved(http, route="/v1/batches/{id}", method="GET", status="200") >= 1
    # No label value anywhere is an id.
    for name, samples in after.items():
        for metric, labels, _ in samples:
            for value in labels.values():
                assert not UUID.search(value), (name, metric, labels)
                assert batch.id not in value and uploaded.id not in value, (name, metric, labels)


def test_dead_letters_are_counted_where_they_are_read(obs_services: Services, obs_stack: stack.StackInfo) -> None:  # fmt: skip
    metric = "cannonade_dead_letters_total"
    on_commands = {"topic": topics.COMMANDS.name, "reason": "undecodable"}
    on_batches = {"topic": topics.BATCHES.name, "reason": "undecodable"}
    before = scrape_all(obs_services)

    async def poison() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=obs_stack.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for topic in (topics.COMMANDS.name, topics.BATCHES.name):
                await producer.send_and_wait(topic, b"not json", key=uuid.uuid4().hex.encode())
        finally:
            await producer.stop()

    asyncio.run(poison())

    def moved(labels: dict[str, str], name: str) -> float | None:
        after = scrape(obs_services, name)
        change = total({name: after}, metric, **labels) - total({name: before[name]}, metric, **labels)  # fmt: skip
        return change or None

    assert eventually(lambda: moved(on_commands, "commands-0"), "a dead letter on commands") == 1
    assert eventually(lambda: moved(on_batches, "projector"), "a dead letter in the projector") == 1


def json_lines(services: Services, name: str) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in log_path(services, name).read_text(errors="replace").splitlines()
        if line.strip()
    ]


def test_logs_are_json_lines_with_role_and_ids(obs_services: Services) -> None:
    # Every line of every process is one JSON object (the test above ran a batch through all
    # of them), with the fields a log pipeline indexes on.
    for name in processes(obs_services):
        lines = json_lines(obs_services, name)
        assert lines, name
        for line in lines:
            assert {"time", "level", "role", "message"} <= line.keys(), (name, line)
            datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    # Faust's and aiokafka's own lines go through the same formatter, under the process role.
    gate = json_lines(obs_services, "gate-0")
    assert any(line["logger"].startswith("faust") and line["role"] == "gate" for line in gate)
    # An execution line names the request, its batch, its claim and the executor.
    executions = [
        line
        for name in ("executor-0", "executor-1")
        for line in json_lines(obs_services, name)
        if "request_id" in line
    ]
    assert any(
        line["role"] == "executor"
        and line["batch_id"]
        and line["claim_id"]
        and line["worker"].startswith("executor:")
        and "failed" in line["message"]
        for line in executions
    ), executions
    # A command's line names the batch it is about.
    commands = json_lines(obs_services, "commands-0")
    assert any(
        line.get("batch_id") and line["message"].startswith("PopulateBatch") for line in commands
    )


def test_readiness_follows_postgres(obs_services: Services, obs_stack: stack.StackInfo) -> None:
    """Stopping PostgreSQL makes the processes that use it not ready (503, the check says
    why) while the write path stays ready; starting it again makes every process ready."""
    uses_db = ("api", "projector", "purge")

    def not_ready(name: str) -> dict[str, Any] | None:
        status, verdict = ready(obs_services, name)
        return verdict if status == 503 else None

    try:
        asyncio.run(stack.stop_postgres(obs_stack.run_dir))
        for name in uses_db:
            verdict = eventually(lambda name=name: not_ready(name), f"{name} not ready without PostgreSQL")  # type: ignore[misc]  # fmt: skip
            assert verdict["status"] == "not ready"
            assert verdict["checks"]["postgres"] != "ok", verdict
            assert http_get(f"{obs_services.health_url(name)}/livez")[0] == 200
        for name in ENGINE:  # the write path never reads the read model
            assert ready(obs_services, name)[0] == 200, name
    finally:
        asyncio.run(stack.start_postgres(obs_stack.run_dir))
    for name in processes(obs_services):
        eventually(
            lambda name=name: ready(obs_services, name)[0] == 200,  # type: ignore[misc]
            f"{name} ready again",
            timeout_s=120,
        )
