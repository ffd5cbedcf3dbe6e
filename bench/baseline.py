"""Baseline benchmark: one batch of N chat completions against the fake upstream (0 ms latency
unless ``--latency-ms``).

    python -m bench.baseline [--requests 10000] [--models 1] [--concurrency 64] [--latency-ms 0]

Starts every service (compose.services) against CANNONADE_KAFKA / CANNONADE_DATABASE_URL when
both are set (in a fresh ``bench_<random>`` database, dropped afterwards), otherwise against a
private stack brought up with ``compose.stack.up`` in a temp dir and torn down afterwards.
Drives the HTTP API with the official ``openai`` SDK and prints:

- upload seconds and upload start -> batch ``in_progress`` seconds;
- end-to-end requests/s: N / (batch create -> batch reads ``completed``, i.e. every row projected);
- projection lag (``projected_at - completed_at``) and claim -> complete latency percentiles;
- peak RSS (VmHWM) of each service process;
- a check that the output file has N lines, one per custom_id.

Figures also go to ``bench/results/baseline-<timestamp>.json``. Service logs stay in the run
dir printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.admin import DescribeGroupsRequest, DescribeGroupsRequest_v1
from openai import AsyncOpenAI

from bench import procs
from compose.services import ModelSpec, Services
from projections.api.auth import create_key
from projections.migrate import migrate
from projections.projector import CONSUMER, TOPICS
from schemas import topics

RESULTS_DIR = Path(__file__).resolve().parent / "results"
USER = "bench-user"
ENDPOINT = "/v1/chat/completions"
START_POLL_S = 0.05  # batch status polling until in_progress
RUN_POLL_S = 0.25  # ... then until completed
PROGRESS_EVERY_S = 5.0
TERMINAL_BAD = ("failed", "cancelling", "cancelled", "expired")


class BenchError(RuntimeError):
    """A run that cannot produce figures; the message says why and where to look."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- backend: existing Kafka + Postgres (fresh database) or a private stack -----------------


@dataclass
class Backend:
    kafka: str
    database_url: str
    admin_url: str | None = None  # set when we created db_name on an existing server
    db_name: str | None = None
    stack_dir: Path | None = None  # set when we brought up a private stack
    stack_pids: dict[str, int] = field(default_factory=dict)  # kafka, postgres (private only)


def with_database(dsn: str, name: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


async def open_backend(run_root: Path, private: bool) -> Backend:
    kafka = os.environ.get("CANNONADE_KAFKA")
    database_url = os.environ.get("CANNONADE_DATABASE_URL")
    if kafka and database_url and not private:
        try:
            busy = await busy_groups(kafka)
        except Exception as exc:  # a best-effort guard
            log(f"warning: could not inspect consumer groups on {kafka}: {exc!r}")
            busy = {}
        if busy:
            raise BenchError(
                f"another Cannonade stack is consuming on {kafka} (active members: {busy}); "
                "its workers would share partitions with the benchmark's. Stop it, or pass "
                "--private-stack (or unset CANNONADE_KAFKA/CANNONADE_DATABASE_URL)"
            )
        name = f"bench_{secrets.token_hex(4)}"
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        backend = Backend(kafka, with_database(database_url, name), database_url, name)
        try:
            await migrate(backend.database_url)
        except BaseException:
            await close_backend(backend)
            raise
        log(f"using Kafka {kafka}, fresh database {name}")
        return backend
    if (kafka or database_url) and not private:
        raise BenchError("set both CANNONADE_KAFKA and CANNONADE_DATABASE_URL, or neither")
    try:
        from compose import stack
    except ImportError as exc:
        raise BenchError(
            f"no external services configured and compose.stack unusable: {exc}"
        ) from exc
    stack_dir = run_root / "stack"
    log(f"starting a private Kafka + PostgreSQL stack in {stack_dir}")
    info = await stack.up(stack_dir)  # on failure up() stops what it started, keeps the logs
    return Backend(
        info.kafka_bootstrap, info.database_url, stack_dir=stack_dir, stack_pids=dict(info.pids)
    )


# Each worker role is one consumer group (``cannonade-<role>``) whatever the stack, so a second
# stack on the same broker would share the partitions with ours (and fail the requests for
# models it does not know). Refuse to run beside one.
_GROUPS = ("cannonade-commands", "cannonade-gate", "cannonade-executor")


async def busy_groups(bootstrap: str) -> dict[str, int]:
    """Active members per Cannonade consumer group on the broker ({} when all are idle)."""

    # aiokafka 0.14 negotiates DescribeGroups v3, whose reply from Kafka 4 it cannot decode;
    # pin v1 (private client API, so any failure only downgrades the check to a warning).
    class DescribeGroupsV1(DescribeGroupsRequest):  # type: ignore[misc]
        _CLASSES = (DescribeGroupsRequest_v1,)

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        busy: dict[str, int] = {}
        for group in _GROUPS:
            node = await admin.find_coordinator(group)
            reply = await admin._client.send(node, DescribeGroupsV1([group]))
            for _err, name, _state, _ptype, _proto, members in reply.groups:
                if members:
                    busy[name] = len(members)
        return busy
    finally:
        await admin.close()


# Topics whose record counts are reported per run: the catalog, which lists the tables'
# changelogs too (a topic missing from the broker would stall the end-offset query).
_COUNTED_TOPICS = [(t.name, t.partitions) for t in topics.ALL]


async def end_offsets(bootstrap: str, names: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(name, p) for name, count in names for p in range(count)]
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): end for tp, end in ends.items()}


def records_between(
    before: dict[tuple[str, int], int], after: dict[tuple[str, int], int]
) -> dict[str, int]:
    """Records appended per topic between two end-offset snapshots."""
    counts: dict[str, int] = {}
    for (topic, partition), end in after.items():
        counts[topic] = counts.get(topic, 0) + end - before.get((topic, partition), 0)
    return counts


async def wait_projector_caught_up(bootstrap: str, database_url: str, timeout_s: float) -> int:
    """Wait until the projector of our fresh database has replayed the shared topics' history,
    so that the replay does not compete with the benchmark. Returns the records replayed."""
    ends = await end_offsets(bootstrap, [(t.name, t.partitions) for t in TOPICS])
    target = {key: end for key, end in ends.items() if end > 0}
    backlog = sum(target.values())
    if backlog:
        log(f"projector replaying {backlog} records of shared topic history before the run")
    deadline = time.monotonic() + timeout_s
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        while True:
            rows = await conn.fetch(
                "SELECT topic, partition, next_offset FROM projection_offsets WHERE consumer = $1",
                CONSUMER,
            )
            done = {(r["topic"], r["partition"]): r["next_offset"] for r in rows}
            if all(done.get(key, 0) >= end for key, end in target.items()):
                return backlog
            if time.monotonic() > deadline:
                raise BenchError(f"projector still replaying history after {timeout_s:.0f}s")
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def close_backend(backend: Backend, keep_db: bool = False) -> None:
    if keep_db and backend.db_name:
        log(f"kept database {backend.database_url}")
    elif backend.admin_url and backend.db_name:
        try:
            conn = await asyncpg.connect(backend.admin_url, timeout=10)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{backend.db_name}" WITH (FORCE)')
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError) as exc:
            log(f"could not drop database {backend.db_name}: {exc}")
    if backend.stack_dir is not None:
        from compose import stack

        await asyncio.to_thread(stack.down, backend.stack_dir)


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system, including reaped children) of each live process."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for name, pid in pids.items():
        if (stat := procs.read_stat(f"/proc/{pid}/stat")) is not None:
            out[name] = sum(int(stat[1][i]) for i in (11, 12, 13, 14)) / tick
    return out


def postgres_children(pid: int) -> dict[str, int]:
    """A postmaster's live backends and auxiliaries, so their CPU is counted too."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = procs.read_stat(entry / "stat")
        if stat is not None and int(stat[1][1]) == pid:
            found[f"postgres:{entry.name}"] = int(entry.name)
    return found


def watched_pids(services: Services, backend: Backend) -> dict[str, int]:
    pids = {name: proc.pid for name, proc in services.procs.items()}
    pids.update(backend.stack_pids)
    if "postgres" in backend.stack_pids:
        pids.update(postgres_children(backend.stack_pids["postgres"]))
    return pids


def cpu_between(
    before: dict[str, float], after: dict[str, float], digits: int = 1
) -> dict[str, float]:
    """CPU seconds per process between two samples, rounded to ``digits``; postgres backends
    summed into one."""
    used: dict[str, float] = {}
    for name, seconds in after.items():
        key = name.split(":", 1)[0]
        used[key] = used.get(key, 0.0) + seconds - before.get(name, 0.0)
    return {name: round(seconds, digits) for name, seconds in sorted(used.items())}


# --- the workload ----------------------------------------------------------------------------


def build_jsonl(n: int, models: list[str]) -> bytes:
    lines = [
        json.dumps(
            {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": ENDPOINT,
                "body": {
                    "model": models[i % len(models)],
                    "messages": [{"role": "user", "content": f"Say hello to #{i}."}],
                    "max_tokens": 16,
                },
            },
            separators=(",", ":"),
        )
        for i in range(n)
    ]
    return ("\n".join(lines) + "\n").encode()


@dataclass
class Timings:
    upload_s: float = 0.0
    upload_to_in_progress_s: float = 0.0
    create_to_completed_s: float = 0.0
    in_progress_to_completed_s: float = 0.0
    batch_id: str = ""
    output_file_id: str | None = None
    failed: int = 0


async def drive(
    client: AsyncOpenAI, n: int, models: list[str], args: argparse.Namespace, logs: Path
) -> tuple[Timings, list[list[float]]]:
    """Upload, create the batch, poll it to completion; returns timings and progress samples."""
    t = Timings()
    data = build_jsonl(n, models)
    log(f"uploading {n} lines ({len(data) / 1e6:.1f} MB)")
    t_upload = time.monotonic()
    file = await client.files.create(
        file=("bench.jsonl", data, "application/jsonl"), purpose="batch"
    )
    t.upload_s = time.monotonic() - t_upload

    t_create = time.monotonic()
    batch = await client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    t.batch_id = batch.id
    log(f"file {file.id} uploaded in {t.upload_s:.2f}s; batch {batch.id} created")

    deadline = t_create + args.start_timeout
    while batch.status == "validating":
        if time.monotonic() > deadline:
            raise BenchError(
                f"batch {batch.id} still validating after {args.start_timeout:.0f}s "
                f"(population stalled?); see {logs}/commands-0.log and projector.log"
            )
        await asyncio.sleep(START_POLL_S)
        batch = await client.batches.retrieve(batch.id)
    t_started = time.monotonic()  # first observation past validating (normally in_progress)
    t.upload_to_in_progress_s = t_started - t_upload
    log(f"batch {batch.status} {t.upload_to_in_progress_s:.2f}s after upload start")

    samples: list[list[float]] = []  # [s since create, completed, failed]
    deadline = t_started + args.timeout
    last_log = last_sample = time.monotonic()
    while batch.status != "completed":
        if batch.status in TERMINAL_BAD:
            raise BenchError(f"batch {batch.id} ended {batch.status}: {batch.errors}")
        counts = batch.request_counts
        done, failed = (counts.completed, counts.failed) if counts else (0, 0)
        now = time.monotonic()
        if now > deadline:
            raise BenchError(
                f"batch {batch.id} not completed after {args.timeout:.0f}s in progress "
                f"({done} completed, {failed} failed of {n}, status {batch.status}); "
                f"see the gate/executor/projector logs in {logs}"
            )
        if now - last_sample >= 1.0:
            samples.append([round(now - t_create, 2), done, failed])
            last_sample = now
        if now - last_log >= PROGRESS_EVERY_S:
            rate = done / max(now - t_create, 1e-9)
            log(f"{batch.status}: {done} completed, {failed} failed of {n} ({rate:.0f} req/s)")
            last_log = now
        await asyncio.sleep(RUN_POLL_S)
        batch = await client.batches.retrieve(batch.id)
    t_done = time.monotonic()
    t.create_to_completed_s = t_done - t_create
    t.in_progress_to_completed_s = t_done - t_started
    t.output_file_id = batch.output_file_id
    t.failed = batch.request_counts.failed if batch.request_counts else 0
    samples.append([round(t_done - t_create, 2), n - t.failed, t.failed])
    log(f"batch completed {t.create_to_completed_s:.2f}s after create")
    return t, samples


async def check_output(client: AsyncOpenAI, output_file_id: str | None, n: int) -> dict[str, Any]:
    """Download the output file: N lines, each custom_id once, all HTTP 200."""
    if output_file_id is None:
        return {"lines": 0, "ok": False, "detail": "no output file"}
    body = await client.files.content(output_file_id)
    lines = [line for line in body.text.splitlines() if line.strip()]
    ids: set[str] = set()
    non_200 = 0
    for line in lines:
        row = json.loads(line)
        ids.add(row["custom_id"])
        if (row.get("response") or {}).get("status_code") != 200:
            non_200 += 1
    ok = len(lines) == n and ids == {f"req-{i}" for i in range(n)} and non_200 == 0
    detail = f"{len(lines)} lines, {len(ids)} distinct custom_ids, {non_200} non-200"
    return {"lines": len(lines), "ok": ok, "detail": detail}


_ROW_STATS = """
WITH r AS (
    SELECT extract(epoch FROM projected_at - completed_at) * 1000 AS lag_ms,
           extract(epoch FROM completed_at - claimed_at) * 1000 AS run_ms,
           extract(epoch FROM started_at - claimed_at) * 1000 AS queue_ms,
           extract(epoch FROM completed_at - started_at) * 1000 AS call_ms
    FROM requests WHERE batch_id = $1 AND state = 'completed'
)
SELECT count(*) AS n,
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY lag_ms) AS lag,
       max(lag_ms) AS lag_max,
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY run_ms) AS run,
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY queue_ms) AS queue,
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY call_ms) AS call
FROM r
"""

# Phase boundaries relative to the batch's created_at (event times; one host, one clock).
_TIMELINE = """
SELECT extract(epoch FROM b.requests_started_at - b.created_at) AS populated,
       extract(epoch FROM min(r.claimed_at) - b.created_at) AS first_claim,
       extract(epoch FROM max(r.claimed_at) - b.created_at) AS last_claim,
       extract(epoch FROM min(r.completed_at) - b.created_at) AS first_complete,
       extract(epoch FROM max(r.completed_at) - b.created_at) AS last_complete,
       extract(epoch FROM max(r.projected_at) - b.created_at) AS last_projected,
       extract(epoch FROM b.completed_at - b.created_at) AS batch_completed,
       max(r.retry_attempt) AS max_retry_attempt
FROM batches b JOIN requests r ON r.batch_id = b.id
WHERE b.id = $1
GROUP BY b.id
"""


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` by nearest rank: the smallest value with at least a
    share ``q`` of them at or below it. Every benchmark's client-side p50 / p99 is this one."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _r(value: Any, digits: int = 1) -> float | None:
    return None if value is None else round(float(value), digits)


async def db_stats(database_url: str, batch_id: str) -> dict[str, Any]:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        row = await conn.fetchrow(_ROW_STATS, batch_id)
        timeline = await conn.fetchrow(_TIMELINE, batch_id)
    finally:
        await conn.close()
    assert row is not None

    def pct(name: str) -> tuple[float | None, float | None]:
        values = row[name] or [None, None]
        return _r(values[0]), _r(values[1])

    stats: dict[str, Any] = {"completed_rows": row["n"], "lag_max_ms": _r(row["lag_max"])}
    for name in ("lag", "run", "queue", "call"):
        stats[f"{name}_p50_ms"], stats[f"{name}_p99_ms"] = pct(name)
    stats["timeline_s"] = (
        {k: (v if k == "max_retry_attempt" else _r(v, 3)) for k, v in timeline.items()}
        if timeline
        else {}
    )
    return stats


def upstream_stats(upstream_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{upstream_url}/_stats", timeout=30) as resp:
        stats = json.load(resp)
    return {"max_in_flight": stats.get("max_in_flight"), "models": stats.get("models", {})}


def lane_handoffs(services: Services) -> dict[str, int]:
    """Every executor's ``cannonade_lane_handoffs_total`` so far, summed by ``next``: calls
    that left a prefetch lane with the next claim queued behind them, or none."""
    counts = {"queued": 0, "none": 0}
    executors = [name for name in services.health_ports if name.startswith("executor-")]
    for name in executors:
        for metric, labels, value in services.metrics(name):
            if metric == "cannonade_lane_handoffs_total":
                counts[labels["next"]] += int(value)
    return counts


def queued_percent(counts: dict[str, int] | None) -> float | None:
    """The share of ``lane_handoffs`` that found the next claim queued, in percent."""
    total = 0 if counts is None else counts["queued"] + counts["none"]
    return 100 * counts["queued"] / total if counts and total else None


def queued_share(counts: dict[str, int]) -> str:
    """``lane_handoffs`` as a report line."""
    share = queued_percent(counts)
    total = counts["queued"] + counts["none"]
    shown = "-" if share is None else f"{share:.1f} %"
    return f"{shown} of {total} claims found the next claim of their lane queued"


# --- orchestration and report ----------------------------------------------------------------


def gate_config(args: argparse.Namespace) -> str:
    """The ``[gate]`` settings a benchmark asks for (``--prefetch``), as configuration text."""
    prefetch = getattr(args, "prefetch", None)
    return "" if prefetch is None else f"[gate]\nprefetch = {prefetch}\n"


async def stop_services(services: Services) -> None:
    log("stopping services")
    await asyncio.to_thread(services.stop)
    shutil.rmtree(services.run_dir / "data", ignore_errors=True)  # keep only the logs


def bench_services(
    run_root: Path, backend: Backend, models: list[str], args: argparse.Namespace
) -> Services:
    """Every service, each model a chat model with ``--concurrency``, the fake upstream at
    ``--latency-ms`` (0 when the benchmark has no such option)."""
    return Services(
        run_root / "services",
        backend.kafka,
        backend.database_url,
        {m: ModelSpec("chat", args.concurrency) for m in models},
        executors=args.executors,
        gates=args.gates,
        upstream_latency_ms=getattr(args, "latency_ms", 0),
        extra_config=gate_config(args),
    )


class Started(NamedTuple):
    """The figures taken once the services are up, before the measured run."""

    start_s: float
    replayed: int
    offsets: dict[tuple[str, int], int]
    cpu: dict[str, float]
    at: float


async def start_services(services: Services, backend: Backend, args: argparse.Namespace) -> Started:
    log(f"starting services (logs in {services.logs})")
    t0 = time.monotonic()
    await asyncio.to_thread(services.start, args.start_services_timeout)
    start_s = time.monotonic() - t0
    log(f"services ready in {start_s:.1f}s")
    replayed = await wait_projector_caught_up(
        backend.kafka, backend.database_url, args.start_services_timeout
    )
    offsets = await end_offsets(backend.kafka, _COUNTED_TOPICS)
    cpu = cpu_seconds(watched_pids(services, backend))
    return Started(start_s, replayed, offsets, cpu, time.monotonic())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_root = Path(tempfile.mkdtemp(prefix="cannonade-bench-"))
    models = ["bench-chat"] if args.models == 1 else [f"bench-chat-{i}" for i in range(args.models)]
    backend = await open_backend(run_root, args.private_stack)
    services: Services | None = None
    rss: dict[str, int] = {}
    try:
        services = bench_services(run_root, backend, models, args)
        started = await start_services(services, backend, args)
        services_start_s, replayed = started.start_s, started.replayed
        offsets_before, cpu_before, t_run = started.offsets, started.cpu, started.at

        secret = await create_key(backend.kafka, backend.database_url, USER)
        client = AsyncOpenAI(
            base_url=f"{services.api_url}/v1", api_key=secret, max_retries=0, timeout=120
        )
        try:
            timings, samples = await drive(client, args.requests, models, args, services.logs)
            output = await check_output(client, timings.output_file_id, args.requests)
        finally:
            await client.close()
        stats = await db_stats(backend.database_url, timings.batch_id)
        upstream = await asyncio.to_thread(upstream_stats, services.upstream_url)
        handoffs = await asyncio.to_thread(lane_handoffs, services)
        cpu = cpu_between(cpu_before, cpu_seconds(watched_pids(services, backend)))
        run_wall_s = time.monotonic() - t_run
        records = records_between(offsets_before, await end_offsets(backend.kafka, _COUNTED_TOPICS))
        rss = services.rss_kib()  # peaks, just before stopping
    finally:
        if services is not None:
            if not rss:
                rss = services.rss_kib()
            await stop_services(services)
        await close_backend(backend, args.keep_db)

    n = args.requests
    return {
        "benchmark": "baseline",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": {
            "requests": n,
            "models": models,
            "concurrency": args.concurrency,
            "executors": args.executors,
            "gates": args.gates,
            "upstream_latency_ms": args.latency_ms,
            "backend": "private stack" if backend.stack_dir else "external",
            "history_replayed_before_run": replayed,
            "cpus": os.cpu_count(),
        },
        "figures": {
            "services_start_s": round(services_start_s, 2),
            "upload_s": round(timings.upload_s, 3),
            "upload_to_in_progress_s": round(timings.upload_to_in_progress_s, 3),
            "in_progress_to_completed_s": round(timings.in_progress_to_completed_s, 3),
            "create_to_completed_s": round(timings.create_to_completed_s, 3),
            "end_to_end_rps": round(n / timings.create_to_completed_s, 1),
            "failed_requests": timings.failed,
            "projection_lag_p50_ms": stats["lag_p50_ms"],
            "projection_lag_p99_ms": stats["lag_p99_ms"],
            "projection_lag_max_ms": stats["lag_max_ms"],
            "claim_to_complete_p50_ms": stats["run_p50_ms"],
            "claim_to_complete_p99_ms": stats["run_p99_ms"],
            "claim_to_start_p50_ms": stats["queue_p50_ms"],
            "claim_to_start_p99_ms": stats["queue_p99_ms"],
            "start_to_complete_p50_ms": stats["call_p50_ms"],
            "start_to_complete_p99_ms": stats["call_p99_ms"],
            "lane_handoffs": handoffs,
            "output_lines": output["lines"],
            "output_ok": output["ok"],
        },
        # CPU seconds each process used from just before the upload to the end of the checks
        # (run_wall_s); kafka and postgres only with a private stack.
        "cpu_s": cpu,
        "run_wall_s": round(run_wall_s, 2),
        "kafka_records": records,  # appended per topic during the run
        "peak_rss_mib": {name: round(kib / 1024, 1) for name, kib in sorted(rss.items())},
        "timeline_s": stats["timeline_s"],
        "output_check": output["detail"],
        "upstream": upstream,
        "progress": samples,  # [s since batch create, completed, failed], ~1/s
        "batch_id": timings.batch_id,
        "logs": str(run_root / "services" / "logs"),
    }


def report(result: dict[str, Any]) -> str:
    f, n = result["figures"], result["params"]["requests"]
    rows: list[tuple[str, str]] = [
        ("requests", f"{n} ({len(result['params']['models'])} model(s), "
                     f"concurrency {result['params']['concurrency']}, "
                     f"upstream latency {result['params']['upstream_latency_ms']} ms)"),
        ("upload", f"{f['upload_s']:.2f} s"),
        ("upload -> in_progress", f"{f['upload_to_in_progress_s']:.2f} s"),
        ("in_progress -> completed", f"{f['in_progress_to_completed_s']:.2f} s"),
        ("create -> completed (projected)", f"{f['create_to_completed_s']:.2f} s"),
        ("end-to-end throughput", f"{f['end_to_end_rps']:.1f} req/s"),
        ("failed requests", str(f["failed_requests"])),
        ("projection lag p50 / p99 / max",
         f"{f['projection_lag_p50_ms']} / {f['projection_lag_p99_ms']} / "
         f"{f['projection_lag_max_ms']} ms"),
        ("claim -> complete p50 / p99",
         f"{f['claim_to_complete_p50_ms']} / {f['claim_to_complete_p99_ms']} ms"),
        ("lanes (gate.prefetch)", queued_share(f["lane_handoffs"])),
        ("output file check",
         f"{'OK' if f['output_ok'] else 'FAIL'} ({result['output_check']})"),
    ]  # fmt: skip
    rss, cpu, wall = result["peak_rss_mib"], result["cpu_s"], result["run_wall_s"]
    for name in sorted(set(rss) | set(cpu)):
        parts = [f"peak RSS {rss[name]:6.1f} MiB" if name in rss else " " * 21]
        if name in cpu:
            parts.append(f"CPU {cpu[name]:6.1f} s ({100 * cpu[name] / wall:3.0f}% of a core)")
        rows.append((f"process {name}", "  ".join(parts)))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)


def stack_options(p: argparse.ArgumentParser, *, keep_db: bool = True) -> None:
    """The options of every benchmark that runs the services on a stack."""
    p.add_argument("--latency-ms", type=int, default=0, help="fake upstream latency (0 ms)")
    p.add_argument("--prefetch", type=int, default=None,
                   help="Cannonade's gate.prefetch (default: the configured default)")  # fmt: skip
    p.add_argument("--start-services-timeout", type=float, default=180.0,
                   help="seconds allowed for the services to become ready (180)")  # fmt: skip
    p.add_argument("--private-stack", action="store_true",
                   help="bring up a private stack even if CANNONADE_KAFKA/... are set")  # fmt: skip
    if keep_db:
        p.add_argument("--keep-db", action="store_true",
                       help="keep the bench_<random> database (external backend only)")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--requests", type=int, default=10_000, help="batch size (default 10000)")
    p.add_argument("--models", type=int, default=1, help="chat models, lines spread round-robin")
    p.add_argument("--concurrency", type=int, default=64, help="per-model concurrency (64)")
    p.add_argument("--executors", type=int, default=1, help="executor workers (1)")
    p.add_argument("--gates", type=int, default=1, help="gate workers (1)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds allowed from in_progress to completed (1800)")  # fmt: skip
    p.add_argument("--start-timeout", type=float, default=600.0,
                   help="seconds allowed from batch create to in_progress (600)")  # fmt: skip
    stack_options(p)
    args = p.parse_args(argv)
    if args.requests < 1 or args.models < 1 or args.concurrency < 1 or args.latency_ms < 0:
        p.error("--requests, --models and --concurrency must be >= 1, --latency-ms >= 0")
    return args


def save_and_report(name: str, title: str, result: dict[str, Any], text: str) -> Path:
    """Write the figures to ``bench/results/<name>-<UTC stamp>.json`` and print them."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(title)
    print(text)
    print(f"  results: {path}" + (f"\n  logs:    {result['logs']}" if "logs" in result else ""))
    return path


def run_stack_bench(
    name: str,
    title: str,
    run_: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]],
    report_: Callable[[dict[str, Any]], str],
    args: argparse.Namespace,
) -> int:
    """The ``main`` of a benchmark that drives the whole system: run, save, print."""
    try:
        result = asyncio.run(run_(args))
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    save_and_report(name, title, result, report_(result))
    return 0 if result["figures"]["output_ok"] else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stack_bench(
        "baseline",
        f"Cannonade baseline (fake upstream, {args.latency_ms} ms latency)",
        run,
        report,
        args,
    )


if __name__ == "__main__":
    sys.exit(main())
