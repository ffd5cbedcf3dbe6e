"""Chain steps whose executor goes away, against the real stack (responses §2.9, §9.3): a
restart of the step executors while a slow tool runs, and a crash after a rebalance let the
step's work go (the step executor lets it go so that a slow call holds neither the group nor a
stop). Either way the chain must end with the step `step_abandoned` — never run twice, never
waiting for good.

Its own stack and services: the step deadline (the processing timeout) is short here, so that
the crash's recovery fits in a test."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from cannonade.testing.fake_tools import FakeToolsControl
from cannonade.testing.fake_upstream import FakeUpstreamControl
from compose import stack
from compose.services import ModelSpec, Services
from projections.api.auth import create_key
from tests.integration.conftest import (
    TOOL_USERS,
    TOOLS_CONFIG,
    eventually,
    own_services,
    own_stack,
    run,
)
from tests.integration.test_chains import (
    calls,
    error_type,
    marker,
    model_calls,
    steps_of,
    wait_for_response,
)

pytestmark = pytest.mark.integration

MODEL = "chat-b"  # the model the server-side tools serve
MODELS = {MODEL: ModelSpec("chat", 8)}
STEP_DEADLINE_S = 30
# The tool outlasts every test (below its 120 s timeout): its step can only end abandoned.
TOOL_LATENCY_MS = 110_000
CONFIG = (
    TOOLS_CONFIG
    + f"""
[executor]
heartbeat_interval_ms = 1000

[liveness]
processing_timeout_ms = {STEP_DEADLINE_S * 1000}
stale_daemon_threshold_ms = 6000
"""
)
ABANDONED_AT_STOP = "still running at shutdown: abandoned"


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack.StackInfo]:
    yield from own_stack(tmp_path_factory.mktemp("step-liveness") / "stack")


@pytest.fixture(scope="module")
def services(
    live_stack: stack.StackInfo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Services]:
    dir_ = tmp_path_factory.mktemp("step-liveness-services")
    yield from own_services(dir_, live_stack, MODELS, extra_config=CONFIG)


@pytest.fixture(scope="module")
def client(services: Services, live_stack: stack.StackInfo) -> OpenAI:
    key = run(create_key(live_stack.kafka_bootstrap, live_stack.database_url, TOOL_USERS[0]))
    return OpenAI(base_url=f"{services.api_url}/v1", api_key=key, max_retries=0, timeout=60)


def executors(services: Services) -> list[str]:
    return sorted(name for name in services.procs if name.startswith("executor-"))


def handed_out_again(services: Services) -> float:
    """Chain steps whose work the chain agent sent out again after their deadline."""
    name = "cannonade_chain_steps_handed_out_again_total"
    return sum(value for sample, _, value in services.metrics("chains-0") if sample == name)


def start_slow_chain(
    client: OpenAI, tools: FakeToolsControl, upstream: FakeUpstreamControl
) -> tuple[str, str]:
    """A background response whose first round calls the slow tool; returns once the tool is
    running (marker, response id)."""
    mark = marker()
    upstream.script(
        calls(("call_s", "slow_tool", {"m": mark})), {"content": f"done {mark}"}, marker=mark
    )
    tools.script({"result": {"ok": True}, "latency_ms": TOOL_LATENCY_MS}, tool="slow_tool", marker=mark)  # fmt: skip
    response = client.responses.create(model=MODEL, input=f"be slow {mark}", background=True)
    eventually(lambda: tools.received(marker=mark), "the slow tool to be called")
    return mark, response.id


def assert_abandoned_once(
    client: OpenAI, tools: FakeToolsControl, upstream: FakeUpstreamControl, mark: str, rid: str
) -> None:
    final = wait_for_response(client, rid)
    assert final.status == "failed" and error_type(final) == "step_abandoned"
    assert len(tools.received(marker=mark)) == 1  # never fired again
    assert len(model_calls(upstream, mark)) == 1  # the chain went no further


def signal_together(services: Services, names: list[str], sig: int) -> dict[str, int]:
    """Signal every one of ``names`` at once and wait for each to exit (:meth:`Services.kill`,
    30 s at most); returns their restart counts, for :func:`wait_restarted`."""
    with ThreadPoolExecutor(len(names)) as pool:
        return dict(zip(names, pool.map(lambda n: services.kill(n, sig), names), strict=True))


def wait_restarted(services: Services, restarts: dict[str, int]) -> None:
    for name, count in restarts.items():
        services.wait_restarted(name, count)


def test_restarting_the_executors_mid_step_has_the_stopping_one_end_the_step_abandoned(
    client: OpenAI, services: Services, tools: FakeToolsControl, upstream: FakeUpstreamControl
) -> None:
    mark, rid = start_slow_chain(client, tools, upstream)
    copies = handed_out_again(services)

    # Every executor told to stop at once, as a deploy does: a stop that waited for the tool
    # would outlast kill()'s 30 s wait for the exit.
    names = executors(services)
    restarts = signal_together(services, names, signal.SIGTERM)

    assert_abandoned_once(client, tools, upstream, mark, rid)
    # The stopping executor said so itself; the chain's deadline had no part in it.
    logs = "".join((services.logs / f"{name}.log").read_text() for name in names)
    tool_steps = [str(s["id"]) for s in steps_of(services, rid) if s["step_kind"] == "tool_call"]
    assert [f"step {step} {ABANDONED_AT_STOP}" in logs for step in tool_steps] == [True]
    assert handed_out_again(services) == copies
    wait_restarted(services, restarts)


def test_a_step_lost_with_its_executor_after_a_rebalance_is_abandoned_after_its_deadline(
    client: OpenAI, services: Services, tools: FakeToolsControl, upstream: FakeUpstreamControl
) -> None:
    mark, rid = start_slow_chain(client, tools, upstream)
    copies = handed_out_again(services)

    # A new executor joins: at the rebalance the running step's work is let go (its offset
    # commits), so the executors killed next leave it to no one but the chain's deadline.
    old = executors(services)
    services.wait_ready(services.start_worker("executor", len(old)))
    restarts = signal_together(services, old, signal.SIGKILL)

    assert_abandoned_once(client, tools, upstream, mark, rid)
    assert handed_out_again(services) > copies
    wait_restarted(services, restarts)
