"""The pure pieces of metrics, health and logs: label bounding, the gate's backlog view, the
counting hooks, the readiness endpoint and the log formatter."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from cannonade import config, health, logs
from cannonade.metrics import dead_letter_reason, method_label, model_label, status_label
from projections.metrics import http_metrics
from streams.execution.failure import NetworkError, NonRetriableHttpStatus, Timeout
from streams.execution.outcome import Failure, Success
from streams.metrics import Backlog, Hooks, upstream_status
from tests.unit.test_gate_core import HOUR, Run

# -- label bounding -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("invalid message: Expected `object`, got `str`", "undecodable"),
        ("empty or non-bytes payload", "undecodable"),
        ("undecodable", "undecodable"),
        ("CreateBatch must be keyed by 'f-1'", "wrong_key"),
        ("a body record needs a key", "wrong_key"),
        ("unknown body key 'zzz:1'", "wrong_key"),
        ("RequestStarted does not apply to completed (request r-1)", "state_machine"),
        ("gate could not apply it: KeyError('x')", "handler_error"),
        ("the read model refused it: value too long", "read_model_refused"),
        ("File with ID f-1 does not have purpose 'batch'", "other"),
    ],
)
def test_dead_letter_reasons_fall_into_a_few_classes(reason: str, label: str) -> None:
    assert dead_letter_reason(reason) == label


def test_label_values_come_from_known_sets() -> None:
    assert model_label("gpt-4o", {"gpt-4o"}) == "gpt-4o"
    assert model_label("anything a user typed", {"gpt-4o"}) == "other"
    assert [status_label(s) for s in (200, 429, 599, 0, 1000)] == ["200", "429", "599", "other", "other"]  # fmt: skip
    assert [method_label(m) for m in ("GET", "DELETE", "BREW", "get")] == ["GET", "DELETE", "other", "other"]  # fmt: skip


def test_upstream_status_is_the_code_or_the_failure_variant() -> None:
    assert upstream_status(Success(status=200, body="{}")) == "200"
    assert upstream_status(Failure(NonRetriableHttpStatus(status=404, body=""))) == "404"
    assert upstream_status(Failure(Timeout(error="first chunk"))) == "Timeout"
    assert upstream_status(Failure(NetworkError.of("refused"))) == "NetworkError"


# -- the gate's backlog and the counting hooks ----------------------------------------------


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_gate_backlog_counts_pending_and_in_flight_by_window() -> None:
    run = Run({"m": 3})
    first = run.populate("b", 5, label="24h")
    run.populate("short", 2, label="1h", left=HOUR, window=HOUR)
    # 3 claimed of b (the limit); nothing of the second batch fits.
    assert run.gate.backlog() == {("m", "24h"): (2, 3), ("m", "1h"): (2, 0)}
    # A call fails and waits for its retry (pending again, under its batch's window); the
    # capacity it freed goes to the next row.
    step = run.report(first.dispatched[0], "retry", not_before=run.now + timedelta(minutes=5))
    assert len(step.dispatched) == 1
    counts = run.gate.backlog()
    assert sum(p for p, _ in counts.values()) == 4 and sum(f for _, f in counts.values()) == 3
    assert counts[("m", "24h")][0] >= 1


def test_hooks_count_the_transitions_a_decision_publishes() -> None:
    hooks = Hooks(["m"])
    run = Run({"m": 2})
    before = {
        "claimed": sample("cannonade_requests_claimed_total", model="m"),
        "completed": sample("cannonade_requests_completed_total", model="m"),
        "retried": sample("cannonade_requests_retried_total", model="m", reason="backoff"),
        "failed": sample(
            "cannonade_requests_failed_total", model="m", error_type="NonRetriableHttpStatus"
        ),  # fmt: skip
    }
    step = run.populate("h", 3)
    hooks.gate_published(step.outs, 0.001)
    a, b = step.dispatched
    done = run.report(a)
    hooks.gate_published(done.outs, 0.001)
    retry = run.report(b, "retry", not_before=run.now)
    hooks.gate_published(retry.outs, 0.001)
    failed = run.report(done.dispatched[0], "failed", status=400, error_type="NonRetriableHttpStatus")  # fmt: skip
    hooks.gate_published(failed.outs, 0.001)
    assert sample("cannonade_requests_claimed_total", model="m") - before["claimed"] == 3 + len(retry.dispatched) + len(failed.dispatched)  # fmt: skip
    assert sample("cannonade_requests_completed_total", model="m") - before["completed"] == 1
    assert sample("cannonade_requests_retried_total", model="m", reason="backoff") - before["retried"] == 1  # fmt: skip
    assert sample("cannonade_requests_failed_total", model="m", error_type="NonRetriableHttpStatus") - before["failed"] == 1  # fmt: skip
    # A model no one configured is one label value, whatever its name.
    Hooks([]).gate_published(run.populate("x", 1, model="typed-by-a-user").outs, 0.001)
    assert REGISTRY.get_sample_value("cannonade_requests_claimed_total", {"model": "typed-by-a-user"}) is None  # fmt: skip


# -- HTTP: route patterns and readiness -----------------------------------------------------


async def test_http_requests_are_labelled_by_route_pattern() -> None:
    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=[http_metrics])
    app.router.add_get("/v1/files/{id}", ok)
    name = "cannonade_http_request_duration_seconds_count"
    pattern = {"route": "/v1/files/{id}", "method": "GET", "status": "200"}
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    before = sample(name, **pattern), sample(name, **unmatched)
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/v1/files/file-123")).status == 200
        assert (await client.get("/v1/no/such/file-456")).status == 404
    assert (sample(name, **pattern), sample(name, **unmatched)) == (before[0] + 1, before[1] + 1)
    for metric in REGISTRY.collect():
        for s in metric.samples:
            assert not any("file-123" in v or "file-456" in v for v in s.labels.values())


async def test_readyz_is_503_with_the_reason_until_every_check_passes(monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(health, "CHECK_TIMEOUT_S", 0.05)
    state = {"db": "PostgreSQL unreachable: refused"}

    async def db() -> str | None:
        return state["db"] or None

    async def broken() -> str | None:
        raise RuntimeError("bug")

    async def slow() -> str | None:
        await asyncio.sleep(10)
        return None

    readiness = health.Readiness({"db": db})
    app = web.Application()
    health.add_routes(app.router, readiness)
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/livez")).status == 200
        response = await client.get("/readyz")
        assert response.status == 503
        assert await response.json() == {"status": "not ready", "checks": {"db": "PostgreSQL unreachable: refused"}}  # fmt: skip
        state["db"] = ""
        response = await client.get("/readyz")
        assert (response.status, await response.json()) == (200, {"status": "ready", "checks": {"db": "ok"}})  # fmt: skip
        readiness.add("broken", broken)
        readiness.add("slow", slow)
        checks = (await (await client.get("/readyz")).json())["checks"]
        assert checks["broken"] == "RuntimeError: bug" and checks["slow"].startswith("no answer")
        metrics = await client.get("/metrics")
        assert metrics.status == 200 and "cannonade_dead_letters_total" in await metrics.text()
    # On the API's own port, open to its callers, a reason (internal addresses) is not shown.
    public = web.Application()
    health.add_routes(public.router, readiness, public=True)
    async with TestClient(TestServer(public)) as client:
        response = await client.get("/readyz")
        assert response.status == 503
        assert (await response.json())["checks"] == {"db": "ok", "broken": "unavailable", "slow": "unavailable"}  # fmt: skip


# -- configuration --------------------------------------------------------------------------


def test_metrics_port_per_role_and_from_the_environment(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "c.toml"  # type: ignore[operator]
    path.write_text("[observability]\nmetrics_port = 9100\nmetrics_ports = {gate = 9102}\n")
    loaded = config.load({"CANNONADE_CONFIG": str(path)})
    assert (loaded.observability.port_for("gate"), loaded.observability.port_for("executor")) == (9102, 9100)  # fmt: skip
    env = {"CANNONADE_CONFIG": str(path), "CANNONADE_METRICS_PORT": "0", "CANNONADE_LOG_FORMAT": "console"}  # fmt: skip
    loaded = config.load(env)
    assert loaded.observability.port_for("gate") == 0
    assert loaded.observability.log_format == "console"


# -- logs -----------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers, root.level = handlers, level


def test_json_lines_carry_level_time_role_and_bound_ids(restore_logging: None) -> None:
    out = io.StringIO()  # not a terminal: auto means json
    logs.configure("executor", "auto", "info", out)
    with logs.bound(request_id="r-1", batch_id="b-1", claim_id="c-1"):
        logging.getLogger("streams.agents.executor").info("attempt %d failed", 2)
    logging.getLogger("faust.worker").info("Ready")  # a library's line, same format
    logging.getLogger("streams").debug("below the level")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("streams").exception("it broke")
    first, second, third = (json.loads(line) for line in out.getvalue().splitlines())
    assert list(first)[:4] == ["time", "level", "role", "message"]
    assert first["message"] == "attempt 2 failed" and first["level"] == "info"
    assert (first["role"], first["request_id"], first["batch_id"], first["claim_id"]) == ("executor", "r-1", "b-1", "c-1")  # fmt: skip
    assert datetime.fromisoformat(first["time"].replace("Z", "+00:00")).tzinfo is not None
    assert second["logger"] == "faust.worker" and "request_id" not in second
    assert third["level"] == "error" and "ValueError: boom" in third["exception"]


def test_console_format_is_for_people(restore_logging: None) -> None:
    out = io.StringIO()
    logs.configure("gate", "console", "info", out)
    logging.getLogger("x").info("hello", extra={"batch_id": "b-9"})
    line = out.getvalue()
    assert "hello" in line and "batch_id=b-9" in line and "role=gate" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
    with pytest.raises(ValueError, match="log format"):
        logs.configure("gate", "xml", "info", out)


def test_a_console_traceback_shows_no_frame_s_locals(restore_logging: None) -> None:
    out = io.StringIO()
    logs.configure("api", "console", "info", out)

    def handler(header: str) -> None:
        raise ValueError("boom")

    header = "Bearer " + "cn-secret-key"  # its source line is not in the traceback
    try:
        handler(header)
    except ValueError:
        logging.getLogger("x").exception("unhandled error")
    text = out.getvalue()
    assert "ValueError: boom" in text and "handler" in text
    assert "cn-secret-key" not in text


# -- what ships in compose/ -----------------------------------------------------------------

COMPOSE = Path(__file__).parents[2] / "compose"
ROLES = {"api", "commands", "gate", "executor", "chains", "projector", "purge"}


def test_the_dashboard_plots_metrics_that_exist() -> None:
    suffixes = ("", "_total", "_count", "_sum", "_bucket")
    families = [*REGISTRY.collect(), *Backlog(lambda: {}, Hooks([])).collect()]
    known = {f.name + suffix for f in families for suffix in suffixes}
    dashboard = json.loads((COMPOSE / "grafana" / "cannonade-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) > 20
    used = {name for expr in exprs for name in re.findall(r"\bcannonade_[a-z_]+", expr)}
    assert used and used <= known, used - known


def test_prometheus_scrapes_every_role_that_compose_runs_and_checks() -> None:
    scrape = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    assert {job["job_name"] for job in scrape["scrape_configs"]} == ROLES
    services = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]
    assert ROLES | {"prometheus", "grafana"} <= services.keys()
    for role in ROLES:
        assert "/readyz" in " ".join(services[role]["healthcheck"]["test"]), role


def test_the_broker_keeps_its_log_in_a_volume() -> None:
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    kafka = compose["services"]["kafka"]
    log_dirs = kafka["environment"]["KAFKA_LOG_DIRS"]
    assert f"kafka-data:{log_dirs}" in kafka["volumes"] and "kafka-data" in compose["volumes"]
