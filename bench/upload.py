"""Upload benchmark: N lines uploaded -> batch ``in_progress``, against a plain COPY of the
same rows into PostgreSQL.

    python -m bench.upload [--lines 50000] [--repeats 3]

Backend and services as in :mod:`bench.baseline` (whose helpers it uses): a fresh database on
CANNONADE_KAFKA / CANNONADE_DATABASE_URL when both are set, else a private stack; model
``bench-chat`` (``--concurrency``), fake upstream at ``--latency-ms``. ``--repeats`` times:

- **Cannonade**: with the official ``openai`` SDK, ``files.create`` of bench.baseline's JSONL
  (N ``/v1/chat/completions`` lines), ``batches.create`` (24h), then ``batches.retrieve``
  every 50 ms until the batch leaves ``validating``: the figure is upload start -> the batch
  first seen ``in_progress``. The batch is then cancelled and left to settle (read
  ``cancelled``) so that its execution does not load the next measurement.
- **COPY**: on the same PostgreSQL, into a fresh table shaped like a ``request_templates`` row
  with its body (file_id, line_number, custom_id, method, url, model, body; primary key
  (file_id, line_number)), one ``copy_records_to_table`` of the same N rows, once with the
  body as ``text`` and once as ``jsonb``. Rows are parsed beforehand: only the COPY is timed.

It prints each repetition, the medians, the ratio upload -> in_progress / COPY (target: at
most 3 against the text COPY, the faster of the two), the CPU seconds each process used from
upload start to in_progress and what each burns idle (measured over the ``--pause`` before
each upload), and the load average before and after.
Figures also go to ``bench/results/upload-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from openai import AsyncOpenAI

from bench import procs
from bench.baseline import (
    START_POLL_S,
    BenchError,
    bench_services,
    build_jsonl,
    close_backend,
    cpu_between,
    cpu_seconds,
    log,
    open_backend,
    run_stack_bench,
    stack_options,
    start_services,
    stop_services,
    watched_pids,
)
from compose.services import Services
from projections.api.auth import create_key

USER = "bench-user"
MODEL = "bench-chat"
TARGET_RATIO = 3.0
SETTLED = ("cancelled", "completed", "failed", "expired")


# --- Cannonade: upload -> in_progress --------------------------------------------------------


async def upload_to_in_progress(
    client: AsyncOpenAI, data: bytes, rep: int, args: argparse.Namespace, logs: Path
) -> dict[str, Any]:
    t0 = time.monotonic()
    file = await client.files.create(
        file=(f"upload-{rep}.jsonl", data, "application/jsonl"), purpose="batch"
    )
    t_uploaded = time.monotonic()
    batch = await client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    t_created = time.monotonic()
    deadline = t_created + args.start_timeout
    polls = 1
    while batch.status == "validating":
        if time.monotonic() > deadline:
            raise BenchError(
                f"batch {batch.id} still validating after {args.start_timeout:.0f}s; "
                f"see {logs}/commands-0.log and projector.log"
            )
        await asyncio.sleep(START_POLL_S)
        batch = await client.batches.retrieve(batch.id)
        polls += 1
    t_started = time.monotonic()
    if batch.status != "in_progress":
        raise BenchError(f"batch {batch.id} left validating as {batch.status}: {batch.errors}")
    log(
        f"repeat {rep}: uploaded in {t_uploaded - t0:.2f}s, in_progress "
        f"{t_started - t0:.2f}s after upload start"
    )
    return {
        "file_id": file.id,
        "batch_id": batch.id,
        "upload_s": round(t_uploaded - t0, 3),
        "create_s": round(t_created - t_uploaded, 3),
        "upload_to_in_progress_s": round(t_started - t0, 3),
        "polls": polls,
    }


async def cancel_and_settle(client: AsyncOpenAI, batch_id: str, timeout_s: float) -> float:
    """Cancel the batch and wait until it reads a final status; returns the seconds taken."""
    t0 = time.monotonic()
    batch = await client.batches.cancel(batch_id)
    while batch.status not in SETTLED:
        if time.monotonic() - t0 > timeout_s:
            raise BenchError(f"batch {batch_id} still {batch.status} {timeout_s:.0f}s after cancel")
        await asyncio.sleep(0.5)
        batch = await client.batches.retrieve(batch_id)
    return time.monotonic() - t0


# --- PostgreSQL: a plain COPY of the same rows -----------------------------------------------

COLUMNS = ("file_id", "line_number", "custom_id", "method", "url", "model", "body")
Row = tuple[uuid.UUID, int, str | None, str, str, str, str]


def rows_of(data: bytes) -> list[Row]:
    """The upload's lines as request_templates-shaped rows, the body as its JSON text."""
    file_id = uuid.uuid4()
    rows: list[Row] = []
    for n, line in enumerate(data.splitlines()):
        if not line.strip():
            continue
        obj = json.loads(line)
        body = json.dumps(obj["body"], separators=(",", ":"))
        rows.append(
            (
                file_id,
                n,
                obj.get("custom_id"),
                obj["method"],
                obj["url"],
                obj["body"]["model"],
                body,
            )
        )
    return rows


async def copy_once(conn: asyncpg.Connection, rows: list[Row], body_type: str) -> float:
    """COPY ``rows`` into a fresh table; returns the seconds of the COPY alone."""
    table = f"bench_copy_{uuid.uuid4().hex[:8]}"
    await conn.execute(
        f"CREATE TABLE {table} (file_id uuid NOT NULL, line_number int NOT NULL, "
        f"custom_id text, method text NOT NULL, url text NOT NULL, model text NOT NULL, "
        f"body {body_type} NOT NULL, PRIMARY KEY (file_id, line_number))"
    )
    try:
        t0 = time.perf_counter()
        await conn.copy_records_to_table(table, records=rows, columns=COLUMNS)
        elapsed = time.perf_counter() - t0
        count = await conn.fetchval(f"SELECT count(*) FROM {table}")
        if count != len(rows):
            raise BenchError(f"COPY into {table} left {count} rows, not {len(rows)}")
        return elapsed
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")


# --- orchestration and report ----------------------------------------------------------------


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_root = Path(tempfile.mkdtemp(prefix="cannonade-bench-upload-"))
    backend = await open_backend(run_root, args.private_stack)
    services: Services | None = None
    data = build_jsonl(args.lines, [MODEL])
    rows = rows_of(data)
    reps: list[dict[str, Any]] = []
    try:
        services = bench_services(run_root, backend, [MODEL], args)
        await start_services(services, backend, args)
        secret = await create_key(backend.kafka, backend.database_url, USER)
        client = AsyncOpenAI(
            base_url=f"{services.api_url}/v1", api_key=secret, max_retries=0, timeout=600
        )
        conn = await asyncpg.connect(backend.database_url, timeout=10)
        load_before = procs.loadavg()
        log(f"{args.lines} lines ({len(data) / 1e6:.1f} MB), {args.repeats} repeats; "
            f"load average {load_before}")  # fmt: skip
        try:
            for rep in range(1, args.repeats + 1):
                load = procs.loadavg()
                # The quiet before the upload: what each process burns idle (Kafka's and
                # the workers' polling), in CPU seconds per second.
                idle = cpu_seconds(watched_pids(services, backend))
                t_idle = time.monotonic()
                await asyncio.sleep(args.pause)
                cpu = cpu_seconds(watched_pids(services, backend))
                quiet = time.monotonic() - t_idle
                one = await upload_to_in_progress(client, data, rep, args, services.logs)
                # CPU seconds per process from upload start to in_progress (+ one poll)
                one["cpu_s"] = cpu_between(
                    cpu, cpu_seconds(watched_pids(services, backend)), digits=2
                )
                one["idle_cpu_per_s"] = {
                    k: round(v / quiet, 3) for k, v in cpu_between(idle, cpu, digits=2).items()
                }
                one["settle_s"] = round(
                    await cancel_and_settle(client, one["batch_id"], args.settle_timeout), 2
                )
                await asyncio.sleep(args.pause)
                one["copy_text_s"] = round(await copy_once(conn, rows, "text"), 3)
                one["copy_jsonb_s"] = round(await copy_once(conn, rows, "jsonb"), 3)
                one["load_before"], one["load_after"] = load, procs.loadavg()
                log(
                    f"repeat {rep}: COPY text {one['copy_text_s']:.3f}s, jsonb "
                    f"{one['copy_jsonb_s']:.3f}s (cancelled batch settled in {one['settle_s']}s)"
                )
                reps.append(one)
        finally:
            await conn.close()
            await client.close()
        load_after = procs.loadavg()
    finally:
        if services is not None:
            await stop_services(services)
        await close_backend(backend, args.keep_db)

    up = median([r["upload_to_in_progress_s"] for r in reps])
    text, jsonb = (
        median([r["copy_text_s"] for r in reps]),
        median([r["copy_jsonb_s"] for r in reps]),
    )
    ratios = [r["upload_to_in_progress_s"] / r["copy_text_s"] for r in reps]
    names = sorted({name for r in reps for name in r["cpu_s"]})
    cpu = {name: median([r["cpu_s"].get(name, 0.0) for r in reps]) for name in names}
    idle = {name: median([r["idle_cpu_per_s"].get(name, 0.0) for r in reps]) for name in names}
    return {
        "benchmark": "upload",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": {
            "lines": args.lines,
            "bytes": len(data),
            "repeats": args.repeats,
            "concurrency": args.concurrency,
            "upstream_latency_ms": args.latency_ms,
            "backend": "private stack" if backend.stack_dir else "external",
            "cpus": os.cpu_count(),
        },
        "figures": {
            "upload_s": median([r["upload_s"] for r in reps]),
            "create_s": median([r["create_s"] for r in reps]),
            "upload_to_in_progress_s": up,
            "copy_text_s": text,
            "copy_jsonb_s": jsonb,
            "ratio_vs_copy_text": round(up / text, 2),
            "ratio_vs_copy_jsonb": round(up / jsonb, 2),
            "ratio_vs_copy_text_per_repeat": [round(r, 2) for r in ratios],
            "target_ratio": TARGET_RATIO,
            "within_target": up / text <= TARGET_RATIO,
            "load_before": load_before,
            "load_after": load_after,
            "output_ok": len(reps) == args.repeats,
        },
        "upload_cpu_s_median": cpu,
        "idle_cpu_per_s_median": idle,
        "repeats": reps,
        "logs": str(run_root / "services" / "logs"),
    }


def report(result: dict[str, Any]) -> str:
    f, p = result["figures"], result["params"]
    rows: list[tuple[str, str]] = [
        ("lines", f"{p['lines']} ({p['bytes'] / 1e6:.1f} MB), {p['repeats']} repeats"),
    ]
    for i, r in enumerate(result["repeats"], 1):
        rows.append((
            f"repeat {i}",
            f"upload {r['upload_s']:.2f} s, -> in_progress {r['upload_to_in_progress_s']:.2f} s; "
            f"COPY text {r['copy_text_s']:.3f} s, jsonb {r['copy_jsonb_s']:.3f} s; "
            f"load {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}",
        ))  # fmt: skip
    rows += [
        ("upload (files.create), median", f"{f['upload_s']:.2f} s"),
        ("batches.create, median", f"{f['create_s']:.2f} s"),
        ("upload -> in_progress, median", f"{f['upload_to_in_progress_s']:.2f} s"),
        ("COPY text / jsonb, median", f"{f['copy_text_s']:.3f} s / {f['copy_jsonb_s']:.3f} s"),
        ("ratio vs COPY text (jsonb)",
         f"{f['ratio_vs_copy_text']:.2f} ({f['ratio_vs_copy_jsonb']:.2f}); per repeat "
         f"{', '.join(f'{x:.2f}' for x in f['ratio_vs_copy_text_per_repeat'])}; target <= "
         f"{f['target_ratio']:.0f}: {'met' if f['within_target'] else 'NOT met'}"),
        ("CPU s, upload -> in_progress",
         ", ".join(f"{k} {v:.2f}" for k, v in result["upload_cpu_s_median"].items() if v > 0)
         + f" (median per process; total {sum(result['upload_cpu_s_median'].values()):.2f})"),
        ("idle CPU s per s (before uploads)",
         ", ".join(f"{k} {v:.2f}" for k, v in result["idle_cpu_per_s_median"].items() if v > 0)
         + f" (total {sum(result['idle_cpu_per_s_median'].values()):.2f})"),
        ("load average before -> after",
         f"{' '.join(f'{x:.2f}' for x in f['load_before'])} -> "
         f"{' '.join(f'{x:.2f}' for x in f['load_after'])}"),
    ]  # fmt: skip
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.upload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--lines", type=int, default=50_000, help="lines per upload (50000)")
    p.add_argument("--repeats", type=int, default=3, help="measurements of each side (3)")
    p.add_argument("--concurrency", type=int, default=64, help="the model's limit (64)")
    p.add_argument("--pause", type=float, default=2.0,
                   help="seconds of quiet before each measurement (2)")  # fmt: skip
    p.add_argument("--start-timeout", type=float, default=600.0,
                   help="seconds allowed from batch create to in_progress (600)")  # fmt: skip
    p.add_argument("--settle-timeout", type=float, default=600.0,
                   help="seconds allowed for a cancelled batch to settle (600)")  # fmt: skip
    stack_options(p)
    args = p.parse_args(argv)
    if args.lines < 1 or args.repeats < 1 or args.concurrency < 1 or args.latency_ms < 0:
        p.error("--lines, --repeats and --concurrency must be >= 1, --latency-ms >= 0")
    args.executors = args.gates = 1  # for bench.baseline.bench_services
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stack_bench(
        "upload",
        f"Cannonade upload of {args.lines} lines -> batch in_progress, vs a plain COPY",
        run,
        report,
        args,
    )


if __name__ == "__main__":
    sys.exit(main())
