"""The main job: the local stack, every service, and a demo batch submitted with the ``openai``
SDK against the fake upstream, with progress shown while it runs.

A few lines are scripted to show what users meet in practice: some fail once upstream and
are retried (they still complete), a few are rejected upstream with 400 and end in the
error file.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
import time
from pathlib import Path

from openai import OpenAI

from compose import stack
from compose.services import ModelSpec, Services
from projections.api.auth import create_key

RUN_DIR = Path(".run")
RESULTS = RUN_DIR / "demo-results"


def _lines(count: int) -> bytes:
    lines = []
    for i in range(count):
        body: dict[str, object] = {
            "model": "demo-chat",
            "messages": [{"role": "user", "content": f"Write a haiku about cannon number {i}."}],
        }
        if i % 40 == 7:
            body["x_fake"] = {"status": 400}  # rejected upstream: ends in the error file
        elif i % 25 == 3:
            body["x_fake"] = {"fail_times": 1, "fail_status": 503}  # retried after backoff
        lines.append(
            {
                "custom_id": f"haiku-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
        )
    return "\n".join(json.dumps(line) for line in lines).encode()


def run(count: int) -> None:
    # Turn SIGTERM into an exception so the services and the stack are always taken down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    info = asyncio.run(stack.up(RUN_DIR / "stack"))
    print(f"stack up: kafka {info.kafka_bootstrap}, postgres {info.database_url} ({info.timings})")
    services = Services(
        RUN_DIR / "services", info.kafka_bootstrap, info.database_url,
        {"demo-chat": ModelSpec("chat", 16)}, upstream_latency_ms=25,
    )  # fmt: skip
    try:
        services.start()
        print(
            f"services up in {time.monotonic() - started:.1f}s: API {services.api_url}, logs in {services.logs}"
        )
        client = OpenAI(
            base_url=f"{services.api_url}/v1",
            api_key=asyncio.run(create_key(info.kafka_bootstrap, info.database_url, "demo")),
        )
        uploaded = client.files.create(file=("haiku.jsonl", _lines(count)), purpose="batch")
        print(
            f"uploaded {uploaded.filename}: {uploaded.id} ({uploaded.bytes} bytes, {count} requests)"
        )
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        print(f"batch {batch.id} created ({batch.status})")
        while batch.status not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(0.5)
            batch = client.batches.retrieve(batch.id)
            c = batch.request_counts
            done = (c.completed + c.failed) if c else 0
            total = c.total if c and c.total else count
            bar = "#" * int(30 * done / total)
            sys.stdout.write(
                f"\r  {batch.status:<11} [{bar:<30}] {done}/{total} ({c.failed if c else 0} failed)"
            )
            sys.stdout.flush()
        print()
        shutil.rmtree(RESULTS, ignore_errors=True)
        RESULTS.mkdir(parents=True)
        output, errors = RESULTS / "output.jsonl", RESULTS / "errors.jsonl"
        output.write_text(
            client.files.content(batch.output_file_id).text if batch.output_file_id else ""
        )
        errors.write_text(
            client.files.content(batch.error_file_id).text if batch.error_file_id else ""
        )
        print(f"batch {batch.status} in {time.monotonic() - started:.1f}s total")
        print(f"  results: {output.resolve()} ({len(output.read_text().splitlines())} lines)")
        print(f"  errors:  {errors.resolve()} ({len(errors.read_text().splitlines())} lines)")
        first = json.loads(output.read_text().splitlines()[0])
        print(
            f"  first result: {first['custom_id']} -> {first['response']['body']['choices'][0]['message']['content']!r}"
        )
    finally:
        services.stop()
        stack.down(RUN_DIR / "stack")
