"""A worker's stop: its hooks run before Faust waits for acknowledgements (the step executor
lets its running steps' work go there), and its commits give up after a bound
(streams/stop_commit.py), through Faust's own commit code, while a running worker's wait as
long as they take."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from faust.transport.consumer import Consumer as FaustConsumer

from cannonade.config import Config
from streams import stop_commit
from streams.app import App
from streams.chains.runner import StepRunner, _Running
from streams.worker import build


class Consumer:
    """What Faust's ``Consumer.commit`` reads, with a broker that answers only when told."""

    def __init__(self, *, stopping: bool) -> None:
        self.app = SimpleNamespace(should_stop=stopping, client_only=False)
        self.loop = asyncio.get_running_loop()
        self._commit_fut: asyncio.Future[None] | None = None
        self.answered = asyncio.Event()
        self.commits = 0

    async def maybe_wait_for_commit_to_finish(self) -> bool:
        return await FaustConsumer.maybe_wait_for_commit_to_finish(self)  # type: ignore[arg-type]

    async def force_commit(self, *args: Any, **kwargs: Any) -> bool:
        self.commits += 1
        await self.answered.wait()  # aiokafka retrying while the coordinator is unreachable
        return True


@pytest.fixture
def bound(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(stop_commit, "STOP_COMMIT_S", 0.05)
    return 0.05


def test_the_worker_commits_through_the_bound() -> None:
    stop_commit.install()
    assert FaustConsumer.commit is stop_commit._commit_while_stopping_is_bounded


async def test_a_stopping_worker_gives_up_a_commit_the_broker_never_answers(
    bound: float, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = Consumer(stopping=True)
    with caplog.at_level(logging.WARNING):
        # (the outer limit only turns a regression's hang into a failure)
        committed = stop_commit._commit_while_stopping_is_bounded(consumer)
        assert await asyncio.wait_for(committed, 60) is False
    assert consumer.commits == 1
    assert "stopping without it" in caplog.text
    # the next commit is not held behind the abandoned one (Faust makes followers wait on it)
    assert consumer._commit_fut is None
    consumer.answered.set()
    assert await stop_commit._commit_while_stopping_is_bounded(consumer) is True


async def test_a_running_worker_waits_for_its_commit_however_long(bound: float) -> None:
    consumer = Consumer(stopping=False)
    commit = asyncio.ensure_future(stop_commit._commit_while_stopping_is_bounded(consumer))
    await asyncio.sleep(bound * 4)  # past the stop's bound: still waiting
    assert not commit.done()
    consumer.answered.set()
    assert await commit is True


def test_the_step_executor_lets_its_running_steps_go_as_the_stop_begins() -> None:
    # else Faust's stop waits out the slowest call before the runner's grace even starts
    [release] = build("executor", Config()).stopping
    runner = release.__self__  # type: ignore[attr-defined]
    assert isinstance(runner, StepRunner)
    acked: list[str] = []
    # a running step's entry: only its acknowledgement is touched by the let-go
    runner.running["s1"] = _Running(None, lambda: acked.append("s1"), None)  # type: ignore[arg-type]
    release()
    assert acked == ["s1"]  # its offset may commit: Faust has nothing to wait for


async def test_the_stop_hooks_run_before_faust_waits_for_the_agents() -> None:
    order: list[str] = []
    app = App("cannonade-test", stopping=[lambda: order.append("hook")])

    async def stop_consumer() -> None:  # where Faust waits for every input to be acknowledged
        order.append("consumer")

    app._stop_consumer = stop_consumer  # type: ignore[method-assign]
    await app.on_stop()
    assert order == ["hook", "consumer"]
