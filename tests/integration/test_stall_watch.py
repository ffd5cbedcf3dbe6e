"""The stall watchdog with a real Faust worker against the real broker: a worker whose agent
stops taking what arrives on its partition is ended, one that keeps taking it is not
(``stall_app``: the watchdog at a 4 s bound, checking every second)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from compose import kafka, stack
from schemas import topics
from streams.recovery_watch import EXIT_CODE
from tests.integration import stall_app
from tests.integration.conftest import until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _taken(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _start(bootstrap: str, topic: str, taken: Path, data: Path, log: Path) -> subprocess.Popen[bytes]:  # fmt: skip
    argv = [sys.executable, "-m", "tests.integration.stall_app", bootstrap, topic, str(taken), str(data)]  # fmt: skip
    with log.open("w") as out:
        return subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


async def test_an_agent_that_stops_taking_records_ends_its_worker_and_a_taking_one_does_not(
    stack_info: stack.StackInfo, tmp_path: Path
) -> None:
    bootstrap = stack_info.kafka_bootstrap
    name = f"test.stall.{uuid.uuid4().hex[:8]}"
    await kafka.create_topics(bootstrap, [topics.Topic(name, key="test", partitions=1, carries="test")])  # fmt: skip
    taken, log = tmp_path / "taken", tmp_path / "worker.log"
    worker = _start(bootstrap, name, taken, tmp_path / "data", log)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)

    async def feeding(done: Callable[[], bool], what: str, *, alive: bool = True) -> None:
        """Send a record every 0.2 s until ``done``; with ``alive``, the worker must live on."""

        async def fed() -> bool:
            ended = worker.poll()
            assert not alive or ended is None, f"the worker ended ({ended}) waiting for {what}: {log.read_text()[-3000:]}"  # fmt: skip
            await producer.send_and_wait(name, b"tick")
            return done()

        try:
            await until(fed, what)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; the worker's log:\n{log.read_text()[-3000:]}") from None

    try:
        await producer.start()
        await feeding(lambda: _taken(taken) > 0, "the worker taking records")
        first = time.monotonic()
        # Taking what arrives for three of the watchdog's bounds is never a stall.
        span = 3 * stall_app.STALL_S
        await feeding(lambda: time.monotonic() - first > span, f"{span:.0f} s of records")
        before = _taken(taken)
        await feeding(lambda: _taken(taken) > before, "the worker still taking records")

        await producer.send_and_wait(name, b"hang")
        await feeding(lambda: worker.poll() is not None, "the stalled worker ending", alive=False)
        assert worker.returncode == EXIT_CODE
        assert f"the stream took no record of {name}[0]" in log.read_text()
    finally:
        await producer.stop()
        if worker.poll() is None:
            worker.kill()
        worker.wait()
