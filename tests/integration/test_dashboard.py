"""The dashboard in a real headless browser (Debian's Chromium, driven by Selenium through the
system chromedriver) against the live API: sign-in with a key, a running batch's progress and
queue depth moving, the numbers matching the API, and the operator's charts."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgspec
import pytest
from openai import OpenAI
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from compose import stack
from compose.services import Services
from projections.api.auth import create_key
from schemas.api import ErrorEnvelope
from schemas.api_dashboard import DashboardUser, QueueDepths, Throughput
from tests.integration.conftest import chat_line, jsonl, run, wait_for_batch

pytestmark = pytest.mark.integration

OPERATOR = "dash-operator"
T = TypeVar("T")

# Everything the page shows of the batches and queues, read in one go.
READ_BOARD = """
const rows = (sel) => Array.from(document.querySelectorAll(sel), (r) => ({...r.dataset}));
return {batches: rows('#batches tbody tr'), queues: Array.from(
  document.querySelectorAll('#queues tbody tr'),
  (r) => ({model: r.dataset.model,
           pending: +r.querySelector('.pending').textContent,
           in_flight: +r.querySelector('.in-flight').textContent}))};
"""


@pytest.fixture(scope="module")
def dashboard_url(services: Services, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An API process whose configuration names the operator."""
    config = tmp_path_factory.mktemp("dashboard") / "cannonade.toml"
    text = Path(services.config_path).read_text()
    config.write_text(text.replace("[api]\n", f'[api]\noperators = ["{OPERATOR}"]\n', 1))
    name = services.start_api(201, env={"CANNONADE_CONFIG": str(config)})
    services.wait_ready(name)
    return services.api_urls[name]


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "compose/bootstrap.sh installs chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):  # fmt: skip
        options.add_argument(arg)
    found = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield found
    finally:
        found.quit()


def until(browser: WebDriver, check: Callable[[WebDriver], T | None], what: str, timeout_s: float = 90) -> T:  # fmt: skip
    return WebDriverWait(browser, timeout_s, poll_frequency=0.1).until(check, f"waiting for {what}")  # type: ignore[return-value]  # fmt: skip


def sign_in(browser: WebDriver, url: str, key: str) -> None:
    browser.get(f"{url}/dashboard")
    browser.execute_script("sessionStorage.clear()")
    browser.get(f"{url}/dashboard")
    field = until(browser, lambda b: b.find_element(By.ID, "key"), "the sign-in form")
    until(browser, lambda _: field.is_displayed(), "the sign-in form")
    field.send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "#signin-form button").click()
    until(browser, lambda b: b.find_element(By.ID, "board").is_displayed(), "the board")


def board(browser: WebDriver) -> dict[str, Any]:
    return browser.execute_script(READ_BOARD)  # type: ignore[no-any-return]


def api_get(url: str, key: str, path: str) -> httpx.Response:
    return httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=60)


def submit(client: OpenAI, lines: list[dict[str, Any]]) -> str:
    uploaded = client.files.create(file=("d.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id


def new_user(stack_info: stack.StackInfo, url: str, user: str) -> tuple[str, OpenAI]:
    key = run(create_key(stack_info.kafka_bootstrap, stack_info.database_url, user))
    return key, OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def test_a_user_follows_a_running_batch_and_their_queue(
    services: Services, stack_info: stack.StackInfo, dashboard_url: str, browser: WebDriver,
    tmp_path: Path,
) -> None:  # fmt: skip
    key, client = new_user(stack_info, dashboard_url, f"dash-{uuid.uuid4().hex[:6]}")
    sign_in(browser, dashboard_url, key)
    me = msgspec.json.decode(api_get(dashboard_url, key, "/v1/dashboard/me").content, type=DashboardUser)  # fmt: skip
    assert not me.operator
    assert browser.find_element(By.ID, "user").text == me.user

    # 48 calls of 0.5 s on chat-a (4 at once): 6 s of progress at least, polled each second.
    batch_id = submit(client, [chat_line(f"d-{n}", latency_ms=500) for n in range(48)])
    seen: list[dict[str, Any]] = []
    queued: list[dict[str, Any]] = []
    screenshot = tmp_path / "dashboard-user.png"

    def finished(b: WebDriver) -> bool:
        shown = board(b)
        row = next((r for r in shown["batches"] if r["batchId"] == batch_id), None)
        if row is not None:
            seen.append(row)
            if 0 < int(row["completed"]) < 48 and not screenshot.exists():
                b.save_screenshot(str(screenshot))
        queued.extend(q for q in shown["queues"] if q["model"] == "chat-a")
        return row is not None and row["status"] == "completed"

    until(browser, finished, "the batch to show completed")
    completed = [int(r["completed"]) for r in seen]
    assert completed == sorted(completed)
    assert any(0 < c < 48 for c in completed), f"progress never shown moving: {completed}"
    assert len({c for c in completed if 0 < c < 48}) >= 2, completed
    assert queued and all(q["pending"] + q["in_flight"] > 0 for q in queued)
    assert screenshot.stat().st_size > 10_000

    # Once done: what the page shows is what /v1/batches answers, and nothing is queued.
    api = client.batches.list(limit=20).data
    assert api[0].id == batch_id
    expected = [
        {"batchId": b.id, "status": b.status, "completed": str(b.request_counts.completed),
         "failed": str(b.request_counts.failed), "total": str(b.request_counts.total)}
        for b in api if b.request_counts is not None
    ]  # fmt: skip
    until(browser, lambda b: board(b)["batches"] == expected, "the API's counts on the page")
    until(browser, lambda b: b.find_element(By.ID, "queues-empty").is_displayed(), "an empty queue")
    queues = msgspec.json.decode(api_get(dashboard_url, key, "/v1/dashboard/queues").content, type=QueueDepths)  # fmt: skip
    assert queues.data == []

    # Not an operator: no charts on the page, and the endpoint behind them answers 403.
    assert not browser.find_element(By.ID, "operator").is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, "svg.chart") == []
    forbidden = api_get(dashboard_url, key, "/v1/dashboard/throughput")
    assert forbidden.status_code == 403
    error = msgspec.json.decode(forbidden.content, type=ErrorEnvelope).error
    assert error.code == "insufficient_permissions"

    # A key revoked while the page is open signs the page out.
    key_id = me.key_id
    assert httpx.delete(f"{dashboard_url}/v1/keys/{key_id}", headers={"Authorization": f"Bearer {key}"}).status_code == 200  # fmt: skip
    until(browser, lambda b: b.find_element(By.ID, "signin").is_displayed(), "the sign-in form")
    assert "no longer accepted" in browser.find_element(By.ID, "signin-error").text


def test_an_operator_sees_throughput_and_latency_charts(
    services: Services, stack_info: stack.StackInfo, dashboard_url: str, browser: WebDriver,
    tmp_path: Path,
) -> None:  # fmt: skip
    key, client = new_user(stack_info, dashboard_url, OPERATOR)
    lines = [chat_line(f"op-{n}", model="chat-b", latency_ms=50) for n in range(12)]
    failing = [chat_line(f"op-f{n}", model="chat-b", status=400) for n in range(3)]
    assert wait_for_batch(client, submit(client, lines + failing)).status == "completed"
    running = submit(client, [chat_line(f"op-r{n}", latency_ms=300) for n in range(40)])

    sign_in(browser, dashboard_url, key)
    assert browser.find_element(By.ID, "operator-badge").is_displayed()
    assert browser.find_element(By.ID, "operator").is_displayed()
    chart = until(browser, lambda b: b.find_element(By.CSS_SELECTOR, "#throughput-chart svg.chart"), "the throughput chart")  # fmt: skip
    assert chart.is_displayed()

    def charted(b: WebDriver) -> dict[str, int] | None:
        throughput = b.find_element(By.ID, "throughput-chart")
        latency = b.find_element(By.ID, "latency-chart")
        found = {
            "completed": int(throughput.get_attribute("data-completed") or 0),
            "failed": int(throughput.get_attribute("data-failed") or 0),
            "points": int(latency.get_attribute("data-points") or 0),
        }
        return found if found["completed"] >= 12 and found["failed"] >= 3 else None

    shown = until(browser, charted, "the operator's completions in the chart")
    assert shown["points"] >= 1
    assert browser.find_elements(By.CSS_SELECTOR, "#throughput-chart rect.done")
    assert browser.find_elements(By.CSS_SELECTOR, "#throughput-chart rect.failed")
    assert browser.find_elements(By.CSS_SELECTOR, "#latency-chart path.p50")
    assert browser.find_elements(By.CSS_SELECTOR, "#latency-chart path.p99")

    # The chart's totals are the endpoint's (read after: it can only have grown meanwhile).
    answer = api_get(dashboard_url, key, "/v1/dashboard/throughput")
    assert answer.status_code == 200
    api = msgspec.json.decode(answer.content, type=Throughput)
    assert len(api.data) == 60 and api.bucket_s == 60
    assert shown["completed"] <= sum(p.completed for p in api.data)
    assert shown["failed"] <= sum(p.failed for p in api.data)
    assert all(p.latency_p50_s <= p.latency_p99_s for p in api.data if p.latency_p50_s is not None and p.latency_p99_s is not None)  # fmt: skip

    until(browser, lambda b: any(r["batchId"] == running for r in board(b)["batches"]), "the running batch")  # fmt: skip
    browser.save_screenshot(str(tmp_path / "dashboard-operator.png"))
    assert wait_for_batch(client, running).status == "completed"
