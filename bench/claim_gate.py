"""Claim gate benchmark: many users' batches over several models, upstream at 0 ms latency
unless ``--latency-ms``.

    python -m bench.claim_gate [--requests 50000] [--models 4] [--users 20] [--concurrency 64]
                               [--gates 2] [--executors 2] [--latency-ms 0]

Backend and services as in :mod:`bench.baseline` (whose helpers it uses): a fresh database on
CANNONADE_KAFKA / CANNONADE_DATABASE_URL when both are set, else a private stack; models
``bench-m0..`` (chat, ``--concurrency`` each). Each of ``--users`` users gets an API key and
uploads one file with an equal share of the requests, each line's ``body.model`` round-robin
over the models; once every file is uploaded, the batches are created back to back and polled
until all read ``completed``. It prints:

- end-to-end requests/s: N / (first batch create -> last batch reads ``completed``);
- fairness: each user's completion time (seconds after the first create: when the SDK saw the
  batch ``completed``, and the event time of the user's last completed row), min/median/max;
- claim latency, capacity freeing -> next claim (target: p99 <= 50 ms): for each call an
  ``ExecutionReport`` ends (gate topic; ``occurred_at`` = when the executor's reporter sent
  it) whose model had work waiting (more rows populated, by ``RequestsPending``, than claimed
  when the report was built; a model that had drained its batches is not waiting on the
  gate), the first ``RequestClaimed`` of that model decided
  at or after it (inside the gate's ``RequestTransitions``, requests topic; ``occurred_at`` =
  the start of the gate's cycle), and the time until the ``DispatchBatch`` carrying that
  claim was sent (dispatch topic, joined by claim id, the record's Kafka timestamp); the time
  to the decision is shown too. p50/p99/max. The three topics are read back from the broker
  after the run (see the comment above ``read_topic``);
  A bare producer -> consumer hop over the same broker, measured meanwhile by
  :mod:`bench.broker_probe`, is printed beside it: the floor under any figure that crosses
  the broker;
- claim -> complete and projection lag percentiles over every row, as the baseline does, and
  the lag over the rows completed after the last create (the sustained rate, without the
  burst of inserting every batch's rows);
- peak RSS (VmHWM) and CPU seconds of each process, and on a private stack the broker's CPU by
  thread group (JIT compiler, GC and VM, request handling, other: its JIT once took half of
  it); a check of every output file.

Figures also go to ``bench/results/claim_gate-<timestamp>.json``, with the latest
``baseline-*.json`` found there quoted for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from openai import AsyncOpenAI
from openai.types import Batch

from bench.baseline import (
    _COUNTED_TOPICS,
    RESULTS_DIR,
    TERMINAL_BAD,
    BenchError,
    bench_services,
    build_jsonl,
    check_output,
    close_backend,
    cpu_between,
    cpu_seconds,
    end_offsets,
    lane_handoffs,
    log,
    nearest_rank,
    open_backend,
    queued_share,
    records_between,
    run_stack_bench,
    stack_options,
    start_services,
    stop_services,
    upstream_stats,
    watched_pids,
)
from bench.broker_probe import BrokerProbe
from bench.procs import jvm_thread_cpu_s, jvm_threads
from compose.services import Services
from projections.api.auth import create_key
from schemas import topics

POLL_S = 0.5  # every unfinished batch is retrieved this often (one call per batch)
PROGRESS_EVERY_S = 5.0

Offsets = dict[tuple[str, int], int]


# --- the workload ----------------------------------------------------------------------------


def shares(total: int, users: int) -> list[int]:
    """Equal shares of ``total`` requests, the remainder going to the first users."""
    base, extra = divmod(total, users)
    return [base + (1 if i < extra else 0) for i in range(users)]


class Drive(msgspec.Struct):
    upload_s: float = 0.0
    create_span_s: float = 0.0  # first create call -> last create answered
    creates_done_epoch: float = 0.0  # wall clock when the last create was answered
    first_create_to_all_completed_s: float = 0.0
    batch_ids: list[str] = msgspec.field(default_factory=list)
    output_file_ids: list[str | None] = msgspec.field(default_factory=list)
    # per user: seconds after the first create when its batch was first seen completed
    completed_after_s: list[float] = msgspec.field(default_factory=list)
    failed: int = 0
    progress: list[list[float]] = msgspec.field(default_factory=list)


async def drive(
    clients: list[AsyncOpenAI], sizes: list[int], models: list[str], timeout_s: float, logs: Path
) -> Drive:
    d = Drive()
    files = []
    t_upload = time.monotonic()
    for u, (client, size) in enumerate(zip(clients, sizes, strict=True)):
        data = build_jsonl(size, models)
        files.append(
            await client.files.create(
                file=(f"user-{u:02d}.jsonl", data, "application/jsonl"), purpose="batch"
            )
        )
    d.upload_s = time.monotonic() - t_upload
    log(f"{len(files)} files ({sum(sizes)} lines) uploaded in {d.upload_s:.1f}s")

    t0 = time.monotonic()
    batches: list[Batch] = []
    for client, file in zip(clients, files, strict=True):
        batches.append(
            await client.batches.create(
                input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        )
    d.create_span_s = time.monotonic() - t0
    d.creates_done_epoch = time.time()
    d.batch_ids = [b.id for b in batches]
    log(f"{len(batches)} batches created in {d.create_span_s:.2f}s")

    total = sum(sizes)
    done_at: dict[int, float] = {}
    last_log = last_sample = t0
    while len(done_at) < len(batches):
        now = time.monotonic()
        if now - t0 > timeout_s:
            raise BenchError(
                f"{len(batches) - len(done_at)} batches not completed {timeout_s:.0f}s after "
                f"the first create; see the gate/executor/projector logs in {logs}"
            )
        waiting = [u for u in range(len(batches)) if u not in done_at]
        fresh = await asyncio.gather(*(clients[u].batches.retrieve(batches[u].id) for u in waiting))
        seen = time.monotonic()
        for u, batch in zip(waiting, fresh, strict=True):
            batches[u] = batch
            if batch.status == "completed":
                done_at[u] = seen - t0
            elif batch.status in TERMINAL_BAD:
                raise BenchError(f"batch {batch.id} ended {batch.status}: {batch.errors}")
        completed = sum(b.request_counts.completed for b in batches if b.request_counts)
        failed = sum(b.request_counts.failed for b in batches if b.request_counts)
        if seen - last_sample >= 1.0:
            d.progress.append([round(seen - t0, 2), completed, failed])
            last_sample = seen
        if seen - last_log >= PROGRESS_EVERY_S:
            log(
                f"{completed} completed, {failed} failed of {total} "
                f"({completed / (seen - t0):.0f} req/s); {len(done_at)}/{len(batches)} batches done"
            )
            last_log = seen
        if len(done_at) < len(batches):
            await asyncio.sleep(max(0.0, POLL_S - (time.monotonic() - now)))
    d.first_create_to_all_completed_s = max(done_at.values())
    d.completed_after_s = [round(done_at[u], 3) for u in range(len(batches))]
    d.output_file_ids = [b.output_file_id for b in batches]
    d.failed = sum(b.request_counts.failed for b in batches if b.request_counts)
    d.progress.append([round(d.first_create_to_all_completed_s, 2), total - d.failed, d.failed])
    log(f"all batches completed {d.first_create_to_all_completed_s:.1f}s after the first create")
    return d


# --- claim latency, read back from the broker ------------------------------------------------
#
# Capacity frees when an executor reports calls finished: every item of ``finished`` in an
# ``ExecutionReport`` (gate topic) ends a claim, whatever its result, and the report's
# ``occurred_at`` is when the executor's reporter sent it (its calls ended within its
# coalescing delay, ~2 ms, before). The next claim of that model is the first ``RequestClaimed``
# (inside the gate's ``RequestTransitions`` records, requests topic) whose ``occurred_at`` -- the
# time the gate began the cycle that decided it -- is at or after the report was sent: no
# earlier cycle can have used the freed slot. That claim reaches an executor in a
# ``DispatchBatch`` (dispatch topic), joined by claim id; its record's Kafka timestamp (set
# when the gate sent it, whole milliseconds) ends the figure.


class _Finished(msgspec.Struct):
    result: str


class _Report(msgspec.Struct):
    """The fields of a gate input the latency needs (others are ignored)."""

    type: str
    occurred_at: datetime
    model: str = ""
    finished: list[_Finished] = []


class _Event(msgspec.Struct):
    type: str
    occurred_at: datetime
    claim_id: str | None = None
    items: list[msgspec.Raw] = []  # a RequestsPending's rows, counted only


class _Transitions(msgspec.Struct):
    type: str
    model: str = ""
    events: list[_Event] = []


class _Item(msgspec.Struct):
    claim_id: str


class _Dispatch(msgspec.Struct):
    type: str
    items: list[_Item] = []


_report = msgspec.json.Decoder(_Report)
_transitions = msgspec.json.Decoder(_Transitions)
_dispatch = msgspec.json.Decoder(_Dispatch)

Visit = Callable[[bytes, int], None]  # (value, Kafka timestamp in ms)


async def read_topic(
    bootstrap: str, topic: topics.Topic, marker: bytes, start: Offsets, end: Offsets, visit: Visit
) -> None:
    """Call ``visit`` on every record of ``topic`` in [start, end) whose value holds
    ``marker``."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=16 << 20
    )
    await consumer.start()
    try:
        parts = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
        consumer.assign(parts)
        remaining = set()
        for tp in parts:
            first, stop = start.get((tp.topic, tp.partition), 0), end[(tp.topic, tp.partition)]
            if stop > first:
                consumer.seek(tp, first)
                remaining.add(tp)
            else:
                consumer.pause(tp)
        deadline = time.monotonic() + 300
        while remaining:
            if time.monotonic() > deadline:
                raise BenchError(f"reading {topic.name} back took over 300s")
            fetched = await consumer.getmany(*remaining, timeout_ms=1000, max_records=20_000)
            for tp, records in fetched.items():
                stop = end[(tp.topic, tp.partition)]
                for record in records:
                    if record.offset >= stop:
                        break
                    if record.value is not None and marker in record.value:
                        visit(record.value, record.timestamp)
                if records and records[-1].offset >= stop - 1:
                    remaining.discard(tp)
                    consumer.pause(tp)
    finally:
        await consumer.stop()


class ClaimStamps(msgspec.Struct):
    # model -> (report sent, report record appended), one per finished call
    freed: dict[str, list[tuple[float, float]]] = msgspec.field(default_factory=dict)
    decided: dict[str, list[tuple[float, str]]] = msgspec.field(default_factory=dict)
    # model -> (populated at, rows): RequestsPending, to tell waiting work from none
    populated: dict[str, list[tuple[float, int]]] = msgspec.field(default_factory=dict)
    sent: dict[str, float] = msgspec.field(default_factory=dict)  # claim id -> dispatch sent
    reports: int = 0


async def read_claim_stamps(bootstrap: str, start: Offsets, end: Offsets) -> ClaimStamps:
    """Epoch seconds of every freed slot and every claim (decided, sent) in [start, end)."""
    found = ClaimStamps()

    def on_report(value: bytes, ts: int) -> None:
        report = _report.decode(value)
        if report.type == "ExecutionReport" and report.finished:
            found.reports += 1
            at = (report.occurred_at.timestamp(), ts / 1000)
            found.freed.setdefault(report.model, []).extend([at] * len(report.finished))

    def on_transitions(value: bytes, _ts: int) -> None:
        record = _transitions.decode(value)
        if record.type == "RequestTransitions":
            for e in record.events:
                if e.type == "RequestClaimed":
                    found.decided.setdefault(record.model, []).append(
                        (e.occurred_at.timestamp(), e.claim_id or "")
                    )
                elif e.type == "RequestsPending":
                    found.populated.setdefault(record.model, []).append(
                        (e.occurred_at.timestamp(), len(e.items))
                    )

    def on_dispatch(value: bytes, ts: int) -> None:
        record = _dispatch.decode(value)
        if record.type == "DispatchBatch":
            for item in record.items:
                found.sent.setdefault(item.claim_id, ts / 1000)

    await read_topic(bootstrap, topics.GATE, b'"ExecutionReport"', start, end, on_report)
    await read_topic(bootstrap, topics.REQUESTS, b'"Request', start, end, on_transitions)
    await read_topic(bootstrap, topics.DISPATCH, b'"DispatchBatch"', start, end, on_dispatch)
    return found


def _spread(values: list[float]) -> dict[str, Any]:
    values = sorted(values)
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "p50_ms": round(nearest_rank(values, 0.5), 1),
        "p99_ms": round(nearest_rank(values, 0.99), 1),
        "max_ms": round(values[-1], 1),
    }


def claim_latency(stamps: ClaimStamps, since: float = 0.0) -> dict[str, Any]:
    """For each slot freed at or after ``since`` whose model had work waiting (rows populated
    and not yet claimed when the report was built): the time to the next claim's dispatch
    being sent (the freeing time truncated to its millisecond, as Kafka timestamps are), and
    its parts: report built -> its record appended by the executor's producer (``executor``),
    -> the gate's cycle began (``to_gate``: the broker hop and the gate's queue), -> the
    dispatch record appended (``gate``: the cycle and its publishing). ``decided`` is the time
    to the cycle's start."""
    parts: dict[str, list[float]] = {"sent": [], "decided": [], "executor": [], "to_gate": [],
                                     "gate": []}  # fmt: skip
    per_model: dict[str, dict[str, Any]] = {}
    finishes = unsent = 0
    for model, ends in sorted(stamps.freed.items()):
        claims = sorted(stamps.decided.get(model, []))
        times = [at for at, _ in claims]
        populations = sorted(stamps.populated.get(model, []))
        pop_times = [at for at, _ in populations]
        pop_rows = list(itertools.accumulate(rows for _, rows in populations))
        mine: dict[str, list[float]] = {"sent": [], "decided": []}
        for at, appended in ends:
            if at < since:
                continue
            finishes += 1
            i = bisect.bisect_left(times, at)
            populated = bisect.bisect_right(pop_times, at)
            if i == len(times) or populated == 0 or pop_rows[populated - 1] <= i:
                continue  # nothing was waiting to be claimed (every populated row had been)
            decided_at = times[i]
            mine["decided"].append((decided_at - at) * 1000)
            sent_at = stamps.sent.get(claims[i][1])
            if sent_at is None:
                unsent += 1  # its dispatch is past the end offsets read
                continue
            at_ms = math.floor(at * 1000) / 1000
            mine["sent"].append((sent_at - at_ms) * 1000)
            parts["executor"].append((appended - at_ms) * 1000)
            parts["to_gate"].append((decided_at - appended) * 1000)
            parts["gate"].append((sent_at - decided_at) * 1000)
        parts["sent"].extend(mine["sent"])
        parts["decided"].extend(mine["decided"])
        per_model[model] = {
            "finishes": sum(1 for at, _ in ends if at >= since),
            "with_pending": len(mine["decided"]),
            **_spread(mine["sent"]),
            "decided": _spread(mine["decided"]),
        }
    return {
        "finishes": finishes,
        "with_pending": len(parts["decided"]),
        "claims_without_dispatch": unsent,
        **_spread(parts["sent"]),
        **{name: _spread(parts[name]) for name in ("decided", "executor", "to_gate", "gate")},
        "per_model": per_model,
    }


# --- database figures ------------------------------------------------------------------------

# Lag over every row, and over the rows completed once every batch was created ($2): while
# the batches are created the projector also inserts their 50,000 rows, a burst on top of the
# sustained rate.
_ROWS = """
WITH r AS (
    SELECT extract(epoch FROM projected_at - completed_at) * 1000 AS lag_ms,
           extract(epoch FROM completed_at - claimed_at) * 1000 AS run_ms,
           completed_at >= $2 AS steady
    FROM requests WHERE batch_id = ANY($1::uuid[]) AND state = 'completed'
)
SELECT count(*) AS n,
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY lag_ms) AS lag,
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY lag_ms) FILTER (WHERE steady)
           AS steady_lag,
       count(*) FILTER (WHERE steady) AS steady_n,
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY run_ms) AS run
FROM r
"""

# Per batch (one per user), event times relative to the earliest batch's created_at.
_PER_BATCH = """
WITH t0 AS (SELECT min(created_at) AS at FROM batches WHERE id = ANY($1::uuid[]))
SELECT b.id::text AS id,
       extract(epoch FROM min(r.claimed_at) - t0.at) AS first_claim,
       extract(epoch FROM max(r.completed_at) - t0.at) AS last_complete
FROM batches b CROSS JOIN t0 JOIN requests r ON r.batch_id = b.id
WHERE b.id = ANY($1::uuid[])
GROUP BY b.id, t0.at
"""


async def db_figures(database_url: str, batch_ids: list[str], steady_from: float) -> dict[str, Any]:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetchrow(_ROWS, batch_ids, datetime.fromtimestamp(steady_from, UTC))
        per_batch = {r["id"]: r for r in await conn.fetch(_PER_BATCH, batch_ids)}
    finally:
        await conn.close()
    assert rows is not None
    lag, run = rows["lag"] or [None, None], rows["run"] or [None, None]
    steady = rows["steady_lag"] or [None, None]

    def r1(v: Any) -> float | None:
        return None if v is None else round(float(v), 1)

    return {
        "completed_rows": rows["n"],
        "projection_lag_p50_ms": r1(lag[0]),
        "projection_lag_p99_ms": r1(lag[1]),
        "projection_lag_after_creates": {
            "rows": rows["steady_n"],
            "p50_ms": r1(steady[0]),
            "p99_ms": r1(steady[1]),
        },
        "claim_to_complete_p50_ms": r1(run[0]),
        "claim_to_complete_p99_ms": r1(run[1]),
        "first_claim_s": [round(float(per_batch[b]["first_claim"]), 3) for b in batch_ids],
        "last_complete_s": [round(float(per_batch[b]["last_complete"]), 3) for b in batch_ids],
    }


def spread(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 2),
        "median": round(statistics.median(values), 2),
        "max": round(max(values), 2),
    }


def latest_baseline() -> dict[str, Any] | None:
    found = sorted(RESULTS_DIR.glob("baseline-*.json"))
    if not found:
        return None
    data = json.loads(found[-1].read_text())
    p, f = data["params"], data["figures"]
    return {
        "file": found[-1].name,
        "requests": p["requests"],
        "models": len(p["models"]),
        "gates": p["gates"],
        "executors": p["executors"],
        "end_to_end_rps": f["end_to_end_rps"],
        "claim_to_complete_p50_ms": f["claim_to_complete_p50_ms"],
        "claim_to_complete_p99_ms": f["claim_to_complete_p99_ms"],
        "peak_rss_mib": data["peak_rss_mib"],
    }


# --- orchestration and report ----------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_root = Path(tempfile.mkdtemp(prefix="cannonade-bench-claim-"))
    models = [f"bench-m{i}" for i in range(args.models)]
    users = [f"bench-user-{i:02d}" for i in range(args.users)]
    sizes = shares(args.requests, args.users)
    backend = await open_backend(run_root, args.private_stack)
    services: Services | None = None
    rss: dict[str, int] = {}
    try:
        services = bench_services(run_root, backend, models, args)
        started = await start_services(services, backend, args)
        services_start_s, replayed = started.start_s, started.replayed
        offsets_before, cpu_before, t_run = started.offsets, started.cpu, started.at
        broker = backend.stack_pids.get("kafka")  # a private stack's broker only
        threads_before = jvm_threads(broker) if broker else {}

        secrets = [await create_key(backend.kafka, backend.database_url, u) for u in users]
        clients = [
            AsyncOpenAI(base_url=f"{services.api_url}/v1", api_key=s, max_retries=0, timeout=120)
            for s in secrets
        ]
        probe = BrokerProbe(backend.kafka)
        await probe.start()
        try:
            try:
                d = await drive(clients, sizes, models, args.timeout, services.logs)
            finally:
                probed = await probe.stop()
            cpu = cpu_between(cpu_before, cpu_seconds(watched_pids(services, backend)))
            broker_threads = jvm_thread_cpu_s(threads_before, jvm_threads(broker) if broker else {})
            run_wall_s = time.monotonic() - t_run
            rss = services.rss_kib()  # peaks, before the checks below add any work
            outputs = [
                await check_output(client, file_id, size)
                for client, file_id, size in zip(clients, d.output_file_ids, sizes, strict=True)
            ]
        finally:
            for client in clients:
                await client.close()
        stats = await db_figures(backend.database_url, d.batch_ids, d.creates_done_epoch)
        upstream = await asyncio.to_thread(upstream_stats, services.upstream_url)
        handoffs = await asyncio.to_thread(lane_handoffs, services)
        offsets_after = await end_offsets(backend.kafka, _COUNTED_TOPICS)
        records = records_between(offsets_before, offsets_after)
        log("reading ExecutionReport, RequestTransitions and DispatchBatch back from the broker")
        stamps = await read_claim_stamps(backend.kafka, offsets_before, offsets_after)
        latency = claim_latency(stamps)
        decided = latency["decided"]
        steady = claim_latency(stamps, since=d.creates_done_epoch)
    finally:
        if services is not None:
            if not rss:
                rss = services.rss_kib()
            await stop_services(services)
        await close_backend(backend, args.keep_db)

    n = args.requests
    output_ok = all(o["ok"] for o in outputs)
    return {
        "benchmark": "claim_gate",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": {
            "requests": n,
            "models": models,
            "users": args.users,
            "requests_per_user": sizes,
            "concurrency": args.concurrency,
            "executors": args.executors,
            "gates": args.gates,
            "upstream_latency_ms": args.latency_ms,
            "backend": "private stack" if backend.stack_dir else "external",
            "history_replayed_before_run": replayed,
        },
        "figures": {
            "services_start_s": round(services_start_s, 2),
            "upload_s": round(d.upload_s, 2),
            "create_span_s": round(d.create_span_s, 3),
            "first_create_to_all_completed_s": round(d.first_create_to_all_completed_s, 2),
            "end_to_end_rps": round(n / d.first_create_to_all_completed_s, 1),
            "failed_requests": d.failed,
            "user_completed_s": spread(d.completed_after_s),
            "user_last_row_completed_s": spread(stats["last_complete_s"]),
            "user_first_claim_s": spread(stats["first_claim_s"]),
            "claim_latency_p50_ms": latency.get("p50_ms"),
            "claim_latency_p99_ms": latency.get("p99_ms"),
            "claim_latency_max_ms": latency.get("max_ms"),
            "claim_latency_samples": latency["with_pending"],
            "claims_without_dispatch": latency["claims_without_dispatch"],
            "execution_finished": latency["finishes"],
            "execution_reports": stamps.reports,
            "claim_decided_p50_ms": decided.get("p50_ms"),
            "claim_decided_p99_ms": decided.get("p99_ms"),
            "claim_decided_max_ms": decided.get("max_ms"),
            # where the time goes: report built -> appended (executor), -> cycle start
            # (broker hop and the gate's queue), -> dispatch appended (the gate's cycle)
            "claim_latency_parts": {k: latency[k] for k in ("executor", "to_gate", "gate")},
            # one bare producer -> consumer hop over the same broker during the run: the floor
            # under anything that crosses it (bench.broker_probe)
            "broker_probe": {name: _spread(values) for name, values in probed.items()},
            # the same over the slots freed once every batch was created
            "claim_latency_after_creates": {
                "samples": steady["with_pending"],
                "p50_ms": steady["p50_ms"],
                "p99_ms": steady["p99_ms"],
                "max_ms": steady["max_ms"],
                "decided": steady["decided"],
            },
            # whether a call that ended found its lane's next claim queued (prefetch): if so,
            # the claim latency above was off the path to the upstream
            "lane_handoffs": handoffs,
            "claim_to_complete_p50_ms": stats["claim_to_complete_p50_ms"],
            "claim_to_complete_p99_ms": stats["claim_to_complete_p99_ms"],
            "projection_lag_p50_ms": stats["projection_lag_p50_ms"],
            "projection_lag_p99_ms": stats["projection_lag_p99_ms"],
            "projection_lag_after_creates": stats["projection_lag_after_creates"],
            "output_ok": output_ok,
        },
        "claim_latency_per_model": latency["per_model"],
        "per_user": {
            "batch_ids": d.batch_ids,
            "completed_s": d.completed_after_s,  # SDK saw `completed`, after the first create
            "last_row_completed_s": stats["last_complete_s"],  # event time, same origin
            "first_claim_s": stats["first_claim_s"],
        },
        "cpu_s": cpu,  # from just before the keys were created to the last batch completed
        "kafka_threads_cpu_s": broker_threads,  # the broker's CPU by thread group, same window
        "run_wall_s": round(run_wall_s, 2),
        "kafka_records": records,
        "peak_rss_mib": {name: round(kib / 1024, 1) for name, kib in sorted(rss.items())},
        "output_check": [o["detail"] for o in outputs],
        "upstream": upstream,
        "progress": d.progress,  # [s since first create, completed, failed], ~1/s
        "baseline": latest_baseline(),
        "logs": str(run_root / "services" / "logs"),
    }


def report(result: dict[str, Any]) -> str:
    f, p = result["figures"], result["params"]

    def s(key: str) -> str:
        v = f[key]
        return f"{v['min']:.1f} / {v['median']:.1f} / {v['max']:.1f} s"

    rows: list[tuple[str, str]] = [
        ("requests", f"{p['requests']} ({len(p['models'])} models x {p['users']} users, "
                     f"concurrency {p['concurrency']}/model, {p['gates']} gates, "
                     f"{p['executors']} executors)"),
        ("upload (all files)", f"{f['upload_s']:.1f} s"),
        ("batch creates (first -> last)", f"{f['create_span_s']:.2f} s"),
        ("first create -> all completed", f"{f['first_create_to_all_completed_s']:.1f} s"),
        ("end-to-end throughput", f"{f['end_to_end_rps']:.1f} req/s"),
        ("failed requests", str(f["failed_requests"])),
        ("per-user completed min/med/max", s("user_completed_s")),
        ("per-user last row done min/med/max", s("user_last_row_completed_s")),
        ("per-user first claim min/med/max", s("user_first_claim_s")),
        ("claim latency p50 / p99 / max",
         f"{f['claim_latency_p50_ms']} / {f['claim_latency_p99_ms']} / "
         f"{f['claim_latency_max_ms']} ms to the dispatch sent ({f['claim_latency_samples']} "
         f"of {f['execution_finished']} finished calls had work waiting; "
         f"{f['execution_reports']} reports)"),
        ("  to the claim decided",
         f"{f['claim_decided_p50_ms']} / {f['claim_decided_p99_ms']} / "
         f"{f['claim_decided_max_ms']} ms (gate's clock at the start of the cycle)"),
        ("  parts p50 / p99",
         " + ".join(
             f"{name} {f['claim_latency_parts'][key]['p50_ms']} / "
             f"{f['claim_latency_parts'][key]['p99_ms']}"
             for key, name in (("executor", "executor (report built -> appended)"),
                               ("to_gate", "hop + gate queue"),
                               ("gate", "gate cycle + publish"))) + " ms"),
        ("  after the last create",
         f"{f['claim_latency_after_creates']['p50_ms']} / "
         f"{f['claim_latency_after_creates']['p99_ms']} / "
         f"{f['claim_latency_after_creates']['max_ms']} ms to the dispatch sent "
         f"({f['claim_latency_after_creates']['samples']} samples; decided p50/p99 "
         f"{f['claim_latency_after_creates']['decided']['p50_ms']} / "
         f"{f['claim_latency_after_creates']['decided']['p99_ms']} ms)"),
        ("  a bare broker hop meanwhile",
         f"{f['broker_probe']['hop']['p50_ms']} / {f['broker_probe']['hop']['p99_ms']} / "
         f"{f['broker_probe']['hop']['max_ms']} ms send -> consumed; acknowledged "
         f"{f['broker_probe']['ack']['p50_ms']} / {f['broker_probe']['ack']['p99_ms']} ms "
         "(bench.broker_probe)"),
        ("  lanes (gate.prefetch)", queued_share(f["lane_handoffs"])),
        ("claim -> complete p50 / p99",
         f"{f['claim_to_complete_p50_ms']} / {f['claim_to_complete_p99_ms']} ms"),
        ("projection lag p50 / p99",
         f"{f['projection_lag_p50_ms']} / {f['projection_lag_p99_ms']} ms"),
        ("  after the last create",
         f"{f['projection_lag_after_creates']['p50_ms']} / "
         f"{f['projection_lag_after_creates']['p99_ms']} ms "
         f"({f['projection_lag_after_creates']['rows']} rows)"),
        ("output files check", "OK" if f["output_ok"] else "FAIL"),
    ]  # fmt: skip
    rss, cpu, wall = result["peak_rss_mib"], result["cpu_s"], result["run_wall_s"]
    for name in sorted(set(rss) | set(cpu)):
        parts = [f"peak RSS {rss[name]:6.1f} MiB" if name in rss else " " * 21]
        if name in cpu:
            parts.append(f"CPU {cpu[name]:6.1f} s ({100 * cpu[name] / wall:3.0f}% of a core)")
        rows.append((f"process {name}", "  ".join(parts)))
    if result["kafka_threads_cpu_s"]:
        by_group = sorted(result["kafka_threads_cpu_s"].items(), key=lambda kv: -kv[1])
        rows.append(("  kafka by thread", ", ".join(f"{g} {s:.1f} s" for g, s in by_group)))
    base = result["baseline"]
    if base:
        rows.append((
            "latest baseline run",
            f"{base['end_to_end_rps']} req/s, claim -> complete p50/p99 "
            f"{base['claim_to_complete_p50_ms']} / {base['claim_to_complete_p99_ms']} ms "
            f"({base['requests']} requests, {base['models']} model(s), {base['gates']} gate(s), "
            f"{base['executors']} executor(s); {base['file']})",
        ))  # fmt: skip
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.claim_gate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--requests", type=int, default=50_000, help="total requests (50000)")
    p.add_argument("--models", type=int, default=4, help="chat models bench-m0.. (4)")
    p.add_argument("--users", type=int, default=20, help="users, one batch each (20)")
    p.add_argument("--concurrency", type=int, default=64, help="per-model concurrency (64)")
    p.add_argument("--gates", type=int, default=2, help="gate workers (2)")
    p.add_argument("--executors", type=int, default=2, help="executor workers (2)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds allowed from the first create to all completed (1800)")  # fmt: skip
    stack_options(p)
    args = p.parse_args(argv)
    if min(args.models, args.users, args.concurrency, args.gates, args.executors) < 1:
        p.error("--models, --users, --concurrency, --gates and --executors must be >= 1")
    if args.latency_ms < 0:
        p.error("--latency-ms must be >= 0")
    if args.requests < args.users:
        p.error("--requests must be at least --users")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stack_bench(
        "claim_gate",
        f"Cannonade claim gate benchmark (fake upstream, {args.latency_ms} ms latency)",
        run,
        report,
        args,
    )


if __name__ == "__main__":
    sys.exit(main())
