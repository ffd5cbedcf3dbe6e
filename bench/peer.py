"""Cannonade vs the reference fusillade, side by side on the same box in one run.

    python -m bench.peer [--requests 10000] [--concurrency 64] [--latency-ms 0] [--runs 2]
                         [--claim-interval-ms 1000,10]

Both sides get the same workload: the same N ``/v1/chat/completions`` lines for one model
(``bench.baseline``'s), the same per-model concurrency limit, the same fake upstream process
(started once, shared, at ``--latency-ms``) and the same status polling (every 50 ms until the
batch is in progress, then every 250 ms until it is completed).

- **Cannonade**: every service via ``compose.services``, driven through its HTTP API with the
  openai SDK by ``bench.baseline.drive``, on one Kafka + PostgreSQL (a private stack unless
  CANNONADE_KAFKA / CANNONADE_DATABASE_URL are set, as in ``bench.baseline``).
- **fusillade**: ``bench/peer/fusillade-harness``, a small Rust binary depending on the
  ``fusillade`` crate (=19.0.0, crates.io), built with ``cargo build --release`` on first use.
  It runs fusillade's migrations in a fresh database on the same PostgreSQL cluster, creates
  the file and the batch through fusillade's storage API and runs fusillade's own daemon; once
  for each ``--claim-interval-ms`` (its default 1000 ms, and 10 ms).

Rounds alternate the sides (Cannonade, then fusillade at each claim interval), ``--runs``
rounds; with ``--latency-ms`` above 0 each round ends with the **client floor**: the executor's
upstream client alone through the same lanes (``bench.http_floor --against``), printed beside
each engine's own lanes' rate (first claim -> last completion, from its timeline).

Each side's figures: requests/s (N / batch create -> seen completed), CPU seconds per
1,000 requests of every process involved (PostgreSQL counted over the cluster's whole process
tree, Kafka included for Cannonade; the shared fake upstream reported apart and left out of
both totals), peak memory, claim -> complete p50/p99 from each engine's own request rows, and
the load average before/after. Ratios Cannonade/fusillade are taken round by round. Figures go
to ``bench/results/peer-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from openai import AsyncOpenAI

from bench import procs
from bench.baseline import (
    Backend,
    BenchError,
    build_jsonl,
    check_output,
    close_backend,
    db_stats,
    drive,
    gate_config,
    lane_handoffs,
    log,
    open_backend,
    queued_percent,
    save_and_report,
    stack_options,
    start_services,
    stop_services,
    with_database,
)
from bench.upstream import Upstream
from compose.services import ModelSpec, Services, write_config
from projections.api.auth import create_key
from streams.gate.scoring import GateConfig

MODEL = "bench-chat"
USER = "bench-user"
HARNESS_DIR = Path(__file__).resolve().parent / "peer" / "fusillade-harness"
HARNESS_BIN = HARNESS_DIR / "target" / "release" / "fusillade-harness"
UPSTREAM = "fake upstream"
KAFKA, POSTGRES, HARNESS = "kafka", "postgres", "fusillade-harness"
CANNONADE = "cannonade"
T = TypeVar("T")


class SharedUpstreamServices(Services):
    """Cannonade's services pointed at the shared fake upstream instead of one of their own."""

    def __init__(
        self,
        run_dir: Path,
        backend: Backend,
        models: Mapping[str, ModelSpec],
        upstream_url: str,
        extra_config: str = "",
    ) -> None:
        super().__init__(run_dir, backend.kafka, backend.database_url, models)
        self.upstream_url = upstream_url  # start() waits on this one's /_stats
        write_config(self.config_path, models, upstream_url, self.api_port, extra_config)

    # The upstream is shared and already running, so it is not started here. Services starts
    # each service through start_service (supervised) or, in older versions, _spawn.
    def start_service(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> str:
        if name == "upstream":
            return name
        return str(super().start_service(name, *args, env=env))

    def _spawn(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> Any:
        if name == "upstream":
            return None
        return super()._spawn(name, *args, env=env)  # type: ignore[misc]


# --- the fusillade harness -------------------------------------------------------------------


def build_harness(log_path: Path) -> Path:
    """cargo build --release (a no-op when up to date); the first build takes minutes."""
    cargo = shutil.which("cargo")
    if cargo is None:
        if HARNESS_BIN.exists():
            log(f"cargo not found; using the existing {HARNESS_BIN}")
            return HARNESS_BIN
        raise BenchError("cargo not found: install Rust (rustup) to build the fusillade harness")
    log(f"building the fusillade harness (cargo build --release; log {log_path})")
    t0 = time.monotonic()
    with log_path.open("wb") as out:
        code = subprocess.call(
            [cargo, "build", "--release", "--manifest-path", str(HARNESS_DIR / "Cargo.toml"),
             "--target-dir", str(HARNESS_DIR / "target")],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    if code != 0 or not HARNESS_BIN.exists():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise BenchError(f"building the fusillade harness failed ({code}):\n{tail}")
    log(f"harness ready in {time.monotonic() - t0:.1f}s")
    return HARNESS_BIN


async def _expect(proc: asyncio.subprocess.Process, event: str, wait_s: float, logs: Path) -> Any:
    """The harness's next stdout event, which must be ``event``."""
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(wait_s):
            line = await proc.stdout.readline()
    except TimeoutError:
        raise BenchError(
            f"fusillade harness: no '{event}' within {wait_s:.0f}s; see {logs}"
        ) from None
    if not line:
        code = await proc.wait()
        tail = (await asyncio.to_thread(logs.read_text, errors="replace"))[-2000:]
        raise BenchError(f"fusillade harness exited ({code}) before '{event}':\n{tail}")
    data = json.loads(line)
    if data.get("event") != event:
        raise BenchError(f"fusillade harness: expected '{event}', got {data}; see {logs}")
    return data


async def _go(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    await proc.stdin.drain()


async def _guarded(upstream: Upstream, work: Coroutine[Any, Any, T]) -> T:
    """``work``, abandoned with an error as soon as the shared upstream dies: every request
    would then fail and be retried with backoff, so the run could never finish in time."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(upstream.died())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise BenchError(f"the fake upstream died mid-run (exit {watch.result()})")
    finally:
        for t in (task, watch):
            t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)


# --- runs ------------------------------------------------------------------------------------


class Ctx:
    """What every run shares: options, backend, upstream, the workload file, stack processes."""

    def __init__(
        self, args: argparse.Namespace, run_root: Path, backend: Backend, upstream: Upstream
    ) -> None:
        self.args = args
        self.run_root = run_root
        self.backend = backend
        self.upstream = upstream
        self.jsonl = run_root / "bench.jsonl"
        self.admin_url = backend.admin_url or with_database(backend.database_url, "postgres")
        # bench.baseline.drive / start_services read these options.
        self.ns = argparse.Namespace(
            start_timeout=args.start_timeout,
            timeout=args.timeout,
            start_services_timeout=args.start_services_timeout,
        )
        self.stack = stack_roots(backend)
        # Set while a Cannonade batch exists that has not completed: if its run fails, the
        # batch stays on the topics and the next round's services would carry on with it.
        self.cannonade_batch_open = False

    def before_run(self) -> None:
        self.upstream.ensure()
        self.stack[UPSTREAM] = self.upstream.proc.pid


def stack_roots(backend: Backend) -> dict[str, int]:
    """Kafka's and the PostgreSQL postmaster's pids: the private stack's, or the local
    processes listening on the external addresses (missing when not on this box)."""
    roots = {k: v for k, v in backend.stack_pids.items() if k in (KAFKA, POSTGRES)}
    for name, address in ((KAFKA, backend.kafka), (POSTGRES, backend.database_url)):
        if name in roots:
            continue
        hostport = procs.address_port(address)
        pid = procs.listener_pid(hostport[1]) if hostport and procs.is_local(hostport[0]) else None
        if pid is None:
            log(f"warning: no local {name} process found for {address}; its CPU is not counted")
        else:
            roots[name] = pid
    return roots


def _measured(window: procs.Window, started: float, driver_before: float) -> dict[str, Any]:
    m = window.stop()
    m["window_s"] = round(time.monotonic() - started, 2)
    m["driver_cpu_s"] = round(procs.self_cpu_s() - driver_before, 2)  # this process (SDK, sampler)
    return m


async def cannonade_run(ctx: Ctx, round_no: int) -> dict[str, Any]:
    args, backend = ctx.args, ctx.backend
    services = SharedUpstreamServices(
        ctx.run_root / f"r{round_no}-cannonade",
        backend,
        {MODEL: ModelSpec("chat", args.concurrency)},
        ctx.upstream.url,
        gate_config(args),
    )
    client: AsyncOpenAI | None = None
    try:
        started = await start_services(services, backend, ctx.ns)
        if "upstream" in services.procs:
            raise BenchError("compose.services started its own upstream; the shared one is unused")
        secret = await create_key(backend.kafka, backend.database_url, USER)
        client = AsyncOpenAI(
            base_url=f"{services.api_url}/v1", api_key=secret, max_retries=0, timeout=120
        )
        roots = {name: proc.pid for name, proc in services.procs.items()} | ctx.stack
        await asyncio.to_thread(ctx.upstream.reset)
        window = procs.Window(roots)
        t0, driver0 = time.monotonic(), procs.self_cpu_s()
        window.start()
        try:
            ctx.cannonade_batch_open = True
            timings, _samples = await _guarded(
                ctx.upstream, drive(client, args.requests, [MODEL], ctx.ns, services.logs)
            )
            ctx.cannonade_batch_open = False
        except BaseException:
            window.stop()
            raise
        measured = _measured(window, t0, driver0)
        # A service restarted by the supervisor mid-run: its new process went unmeasured.
        restarted = sorted(n for n, p in services.procs.items() if roots.get(n) != p.pid)
        upstream = await asyncio.to_thread(ctx.upstream.stats)
        handoffs = await asyncio.to_thread(lane_handoffs, services)
        output = await check_output(client, timings.output_file_id, args.requests)
        stats = await db_stats(backend.database_url, timings.batch_id)
    finally:
        if client is not None:
            await client.close()
        await stop_services(services)
    n = args.requests
    return {
        "side": CANNONADE,
        "config": CANNONADE,
        "round": round_no,
        "requests_per_s": round(n / timings.create_to_completed_s, 1),
        "upload_s": round(timings.upload_s, 3),
        "create_to_completed_s": round(timings.create_to_completed_s, 3),
        "upload_to_in_progress_s": round(timings.upload_to_in_progress_s, 3),
        "claim_to_complete_p50_ms": stats["run_p50_ms"],
        "claim_to_complete_p99_ms": stats["run_p99_ms"],
        "claim_to_start_p50_ms": stats["queue_p50_ms"],
        "start_to_complete_p50_ms": stats["call_p50_ms"],
        "completed": stats["completed_rows"],
        "failed": timings.failed,
        "ok": output["ok"] and timings.failed == 0 and not restarted,
        "check": output["detail"] + (f"; restarted mid-run: {restarted}" if restarted else ""),
        "services_start_s": round(started.start_s, 2),
        "timeline_s": stats["timeline_s"],
        "upstream": upstream,
        "lane_handoffs": handoffs,
        "excluded": [UPSTREAM],
        **measured,
        "logs": str(services.logs),
    }


async def fusillade_run(ctx: Ctx, harness: Path, round_no: int, interval_ms: int) -> dict[str, Any]:
    args = ctx.args
    db = f"fusillade_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(ctx.admin_url, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{db}"')
    finally:
        await conn.close()
    log_path = ctx.run_root / f"r{round_no}-fusillade-{interval_ms}ms.log"
    cmd = [
        str(harness),
        "--database-url", with_database(ctx.backend.database_url, db),
        "--input", str(ctx.jsonl),
        "--upstream", ctx.upstream.url,
        "--concurrency", str(args.concurrency),
        "--claim-interval-ms", str(interval_ms),
        "--claim-batch-size", str(args.claim_batch_size),
        "--pool-size", str(args.pool_size),
        "--timeout-s", str(int(args.start_timeout + args.timeout)),
    ]  # fmt: skip
    proc: asyncio.subprocess.Process | None = None
    try:
        with log_path.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err
            )
        ready = await _expect(proc, "ready", 120, log_path)  # migrated, daemon running
        roots = {HARNESS: proc.pid} | ctx.stack
        await asyncio.to_thread(ctx.upstream.reset)
        window = procs.Window(roots)
        t0, driver0 = time.monotonic(), procs.self_cpu_s()
        window.start()
        try:
            await _go(proc)
            wait_s = args.start_timeout + args.timeout + 60
            await _guarded(ctx.upstream, _expect(proc, "completed", wait_s, log_path))
        except BaseException:
            window.stop()
            raise
        measured = _measured(window, t0, driver0)
        upstream = await asyncio.to_thread(ctx.upstream.stats)
        await _go(proc)
        result = await _expect(proc, "result", 120, log_path)
        await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await _drop_database(ctx.admin_url, db)
    n = args.requests
    return {
        "side": "fusillade",
        "config": f"fusillade@{interval_ms}ms",
        "round": round_no,
        "requests_per_s": result["requests_per_s"],
        "upload_s": result["upload_s"],
        "create_to_completed_s": result["create_to_completed_s"],
        "create_to_in_progress_s": result["create_to_in_progress_s"],
        "claim_to_complete_p50_ms": result["claim_to_complete_p50_ms"],
        "claim_to_complete_p99_ms": result["claim_to_complete_p99_ms"],
        "claim_to_start_p50_ms": result["claim_to_start_p50_ms"],
        "start_to_complete_p50_ms": result["start_to_complete_p50_ms"],
        "completed": result["completed"],
        "failed": result["failed"],
        "ok": result["completed"] == n and result["failed"] == 0,
        "check": f"{result['completed']} completed, {result['failed']} failed of {n}",
        "knobs": ready["knobs"],
        "timeline_s": result["timeline_s"],
        "upstream": upstream,
        # fusillade does not use Kafka: the broker only idles beside it.
        "excluded": [UPSTREAM, KAFKA],
        **measured,
        "logs": str(log_path),
    }


async def _drop_database(admin_url: str, name: str) -> None:
    try:
        conn = await asyncpg.connect(admin_url, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
    except (OSError, asyncpg.PostgresError) as exc:
        log(f"could not drop database {name}: {exc}")


async def floor_run(ctx: Ctx, round_no: int) -> dict[str, Any]:
    """The executor's upstream client alone on the same upstream, lanes in lockstep
    (``bench.http_floor --against``, in its own process on uvloop as the executor runs): what
    an engine built on that client can reach, with nothing else running."""
    args = ctx.args
    await asyncio.to_thread(ctx.upstream.reset)
    load_before = procs.loadavg()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.http_floor", "--against", ctx.upstream.url,
        "--requests", str(args.requests), "--concurrency", str(args.concurrency),
        "--latency-ms", str(args.latency_ms),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"bench.http_floor failed ({proc.returncode}): {err.decode()[-500:]}")
    one: dict[str, Any] = json.loads(out)
    one.update(round=round_no, load_before=load_before, load_after=procs.loadavg())
    one["upstream"] = await asyncio.to_thread(ctx.upstream.stats)
    return one


def lanes_rate(run: dict[str, Any], n: int) -> float | None:
    """N / first claim -> last completion, from an engine's own timeline: its lanes' rate
    without the population before them and the status polling after (compare the floor)."""
    timeline = run.get("timeline_s") or {}
    first, last = timeline.get("first_claim"), timeline.get("last_complete")
    if first is None or last is None or last <= first:
        return None
    return round(n / (float(last) - float(first)), 1)


def derived(run: dict[str, Any], n: int) -> None:
    """Per-1000-request CPU and the side's totals (the excluded processes left out)."""
    cpu: dict[str, float] = run["cpu_s"]
    run["cpu_s_per_1000"] = {k: round(v * 1000 / n, 3) for k, v in cpu.items()}
    counted = {k: v for k, v in cpu.items() if k not in run["excluded"]}
    run["cpu_s_per_1000_total"] = round(sum(counted.values()) * 1000 / n, 3)
    run["cores_busy"] = round(sum(counted.values()) / run["window_s"], 2)
    # What else kept the box busy meanwhile: other users, this driver, excluded processes.
    run["box_cores_busy"] = round(run["box_busy_cpu_s"] / run["window_s"], 2)
    run["other_cores_busy"] = round(
        (run["box_busy_cpu_s"] - sum(cpu.values()) - run["driver_cpu_s"]) / run["window_s"], 2
    )
    # Peak memory: VmHWM of single processes, the cluster's peak summed PSS for PostgreSQL.
    memory = {k: v for k, v in run["peak_rss_mib"].items() if k != POSTGRES}
    if POSTGRES in run["peak_pss_tree_mib"]:
        memory[POSTGRES] = run["peak_pss_tree_mib"][POSTGRES]
    run["peak_memory_mib"] = memory
    run["peak_memory_mib_total"] = round(
        sum(v for k, v in memory.items() if k not in run["excluded"]), 1
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_root = Path(tempfile.mkdtemp(prefix="cannonade-bench-peer-"))
    harness = await asyncio.to_thread(build_harness, run_root / "cargo-build.log")
    (run_root / "bench.jsonl").write_bytes(build_jsonl(args.requests, [MODEL]))
    backend = await open_backend(run_root, args.private_stack)
    upstream: Upstream | None = None
    runs: list[dict[str, Any]] = []
    floors: list[dict[str, Any]] = []  # the client alone, a round at a time (latency > 0)
    failures: list[str] = []
    try:
        upstream = await asyncio.to_thread(Upstream, run_root, args.latency_ms)
        ctx = Ctx(args, run_root, backend, upstream)
        log(f"measuring {', '.join(sorted(ctx.stack))} besides each side's own processes")
        cannonade_ok = True
        for round_no in range(1, args.runs + 1):
            steps: list[tuple[str, Callable[[], Any]]] = []
            if cannonade_ok:
                steps.append((CANNONADE, partial(cannonade_run, ctx, round_no)))
            for ms in args.claim_intervals:
                steps.append(
                    (f"fusillade@{ms}ms", partial(fusillade_run, ctx, harness, round_no, ms))
                )
            for name, step in steps:
                # A failed run (say, the upstream was killed, or the box too loaded for a
                # timeout) runs once more: fusillade's from a fresh database, Cannonade's
                # unless its batch was left unfinished (below).
                result: dict[str, Any] | None = None
                for attempt in (1, 2):
                    log(f"round {round_no}/{args.runs}: {name} (load {procs.loadavg()[0]:.2f})")
                    try:
                        await asyncio.to_thread(ctx.before_run)
                        result = await step()
                        break
                    except (BenchError, TimeoutError, RuntimeError, OSError) as exc:
                        failures.append(f"round {round_no} {name}: {exc}")
                        log(f"FAILED round {round_no} {name} (attempt {attempt}): {exc}")
                        # A Cannonade batch left half done would run on in the next round's
                        # services (same topics), so its later runs would not be comparable.
                        if name == CANNONADE and ctx.cannonade_batch_open:
                            cannonade_ok = False
                            log("no further Cannonade runs: a failed batch is left on the topics")
                            break
                if result is None:
                    continue
                derived(result, args.requests)
                runs.append(result)
                # Kept as it goes, so an interrupted run still leaves its finished runs.
                (run_root / "runs.json").write_text(json.dumps(runs, indent=1) + "\n")
                log(
                    f"round {round_no} {name}: {result['requests_per_s']} req/s, "
                    f"{result['cpu_s_per_1000_total']} CPU-s/1000, load "
                    f"{result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}"
                )
            if args.latency_ms > 0:  # at 0 ms the client has no latency to fill: no floor
                try:
                    await asyncio.to_thread(ctx.before_run)
                    floors.append(await floor_run(ctx, round_no))
                    log(f"round {round_no} client floor: {floors[-1]['requests_per_s']} req/s")
                except (BenchError, OSError) as exc:
                    failures.append(f"round {round_no} client floor: {exc}")
    finally:
        if upstream is not None:
            await asyncio.to_thread(upstream.stop)
        await close_backend(backend)
    knobs = next((r["knobs"] for r in runs if "knobs" in r), None)
    return {
        "benchmark": "peer",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": {
            "requests": args.requests,
            "model": MODEL,
            "concurrency": args.concurrency,
            "upstream_latency_ms": args.latency_ms,
            "runs_per_side": args.runs,
            "claim_intervals_ms": args.claim_intervals,
            "claim_batch_size": args.claim_batch_size,
            "pool_size": args.pool_size,
            "cannonade_prefetch": args.prefetch,
            "backend": "private stack" if backend.stack_dir else "external",
            "cpus": os.cpu_count(),
        },
        "fusillade_knobs": knobs,
        "runs": runs,
        "client_floor": floors,
        "summary": summarize(runs, args),
        "failures": failures,
        "upstream_restarts": upstream.restarts if upstream is not None else 0,
        # Every planned run has figures and passed its checks (a failure retried fine is
        # still listed under failures).
        "ok": len(runs) == args.runs * len(configs(args)) and all(r["ok"] for r in runs),
        "logs": str(run_root),
    }


# --- summary and report ----------------------------------------------------------------------


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


_SUMMARY_FIGURES = (
    "requests_per_s",
    "cpu_s_per_1000_total",
    "peak_memory_mib_total",
    "claim_to_complete_p50_ms",
    "claim_to_complete_p99_ms",
)


def configs(args: argparse.Namespace) -> list[str]:
    return [CANNONADE, *(f"fusillade@{ms}ms" for ms in args.claim_intervals)]


def summarize(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Per config: median/min/max of each figure; ratios Cannonade/fusillade round by round."""
    out: dict[str, Any] = {"per_config": {}, "ratios": {}}
    by_config = {c: [r for r in runs if r["config"] == c] for c in configs(args)}
    for config, rs in by_config.items():
        if rs:
            out["per_config"][config] = {
                f: _spread([r[f] for r in rs if r[f] is not None]) for f in _SUMMARY_FIGURES
            }
    cannonade = {r["round"]: r for r in by_config[CANNONADE]}
    for config in configs(args)[1:]:
        ratios: dict[str, Any] = {}
        for f in _SUMMARY_FIGURES:
            values = [
                cannonade[r["round"]][f] / r[f]
                for r in by_config[config]
                if r["round"] in cannonade and r[f] and cannonade[r["round"]][f] is not None
            ]
            if values:
                ratios[f] = _spread(values)
        out["ratios"][config] = ratios
    return out


def _fmt(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    mid = statistics.median(values)
    if len(values) == 1:
        return f"{mid:.{digits}f}"
    return f"{mid:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _prefetch(asked: int | None) -> str:
    return f"{GateConfig().prefetch} (its default)" if asked is None else str(asked)


def report(result: dict[str, Any]) -> str:
    p, runs = result["params"], result["runs"]
    cfgs = [CANNONADE, *(f"fusillade@{ms}ms" for ms in p["claim_intervals_ms"])]
    by = {c: [r for r in runs if r["config"] == c] for c in cfgs}
    lines: list[str] = [
        f"  {p['requests']} requests, model {p['model']} limit {p['concurrency']}, upstream "
        f"latency {p['upstream_latency_ms']} ms, {p['runs_per_side']} round(s) alternating "
        f"sides, {p['backend']}, {p['cpus']} CPUs. Cells: median (min-max) over rounds.",
        f"  cannonade knobs: gate.prefetch {_prefetch(p.get('cannonade_prefetch'))}",
    ]
    knobs = result["fusillade_knobs"]
    if knobs:
        lines += [
            f"  fusillade knobs: claim_interval_ms {' and '.join(map(str, p['claim_intervals_ms']))} "
            f"(its default 1000); claim_batch_size {knobs['claim_batch_size']} (default 100); "
            f"PgPool max_connections {knobs['pool_max_connections']} (sqlx default 10);",
            f"    model_concurrency_limits {knobs['model_concurrency_limits']}; every other "
            f"DaemonConfig field its default (max_retries {knobs['max_retries']}, heartbeat "
            f"{knobs['heartbeat_interval_ms']} ms, urgency_weight {knobs['urgency_weight']}, ...)",
        ]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, get: Callable[[dict[str, Any]], float | None], digits: int = 1) -> None:
        cells = []
        for c in cfgs:
            vals = [v for r in by[c] if (v := get(r)) is not None]
            cells.append(_fmt(vals, digits))
        rows.append((label, cells))

    row("requests/s", lambda r: r["requests_per_s"])
    row("  lanes: first claim -> last completion", lambda r: lanes_rate(r, p["requests"]))
    row("  lanes: calls whose next claim was queued, %", lambda r: queued_percent(r.get("lane_handoffs")))  # fmt: skip
    row("batch create -> completed, s", lambda r: r["create_to_completed_s"], 2)
    row("claim -> complete p50, ms", lambda r: r["claim_to_complete_p50_ms"])
    row("claim -> complete p99, ms", lambda r: r["claim_to_complete_p99_ms"])
    row("failed requests", lambda r: r["failed"], 0)
    if p["upstream_latency_ms"] > 0:  # at 0 ms a call is hardly in flight: nothing to fill
        row("upstream: mean calls in flight", lambda r: r["upstream"].get("mean_in_flight"))
        row(
            "upstream: share of time at the max in flight",
            lambda r: r["upstream"].get("share_at_max"),
            2,
        )
    row("CPU-s per 1000 requests, total", lambda r: r["cpu_s_per_1000_total"], 2)
    names = sorted({k for r in runs for k in r["cpu_s"]} - {UPSTREAM, KAFKA, POSTGRES})
    for name in [*names, POSTGRES, KAFKA]:
        label = f"  {name}" + (" (whole cluster)" if name == POSTGRES else "")
        cells = []
        for c in cfgs:
            vals = [r["cpu_s_per_1000"][name] for r in by[c] if name in r["cpu_s_per_1000"]]
            cell = _fmt(vals, 2)
            if vals and any(name in r["excluded"] for r in by[c]):
                cell = f"[{cell} idle, excl.]"
            cells.append(cell)
        rows.append((label, cells))
    row(f"{UPSTREAM} (shared, excluded)", lambda r: r["cpu_s_per_1000"].get(UPSTREAM), 2)
    row("cores busy: counted processes", lambda r: r["cores_busy"], 2)
    row("cores busy: whole box", lambda r: r["box_cores_busy"], 2)
    row("  of which not ours (other users)", lambda r: r["other_cores_busy"], 2)
    row("peak memory MiB, total", lambda r: r["peak_memory_mib_total"], 0)
    for name in [*names, POSTGRES, KAFKA]:
        kind = "sum of PSS, 1 Hz" if name == POSTGRES else "VmHWM"
        cells = []
        for c in cfgs:
            vals = [r["peak_memory_mib"][name] for r in by[c] if name in r["peak_memory_mib"]]
            cell = _fmt(vals, 0)
            if vals and any(name in r["excluded"] for r in by[c]):
                cell = f"[{cell} excl.]"
            cells.append(cell)
        rows.append((f"  {name} ({kind})", cells))
    rows.append((
        "load avg 1 min, before -> after",
        [", ".join(f"{r['load_before'][0]:.2f}->{r['load_after'][0]:.2f}" for r in by[c]) or "-"
         for c in cfgs],
    ))  # fmt: skip
    rows.append(("checks", [
        ", ".join("ok" if r["ok"] else f"FAIL ({r['check']})" for r in by[c]) or "-" for c in cfgs
    ]))  # fmt: skip
    width = max(len(label) for label, _ in rows)
    colw = [max(len(c), *(len(cells[i]) for _, cells in rows)) for i, c in enumerate(cfgs)]
    header = (
        "  " + " " * width + "  " + "  ".join(c.ljust(w) for c, w in zip(cfgs, colw, strict=True))
    )
    lines.append(header)
    for label, cells in rows:
        body = "  ".join(cell.ljust(w) for cell, w in zip(cells, colw, strict=True))
        lines.append(f"  {label:<{width}}  {body}")

    lines.append("  per round (load average 1/5/15 min before -> after):")
    for r in sorted(runs, key=lambda r: (r["round"], cfgs.index(r["config"]))):
        lb, la = r["load_before"], r["load_after"]
        lines.append(
            f"    round {r['round']} {r['config']:<18} {r['requests_per_s']:7.1f} req/s  "
            f"{r['cpu_s_per_1000_total']:6.2f} CPU-s/1000  {r['peak_memory_mib_total']:6.0f} MiB  "
            f"p50/p99 {r['claim_to_complete_p50_ms']}/{r['claim_to_complete_p99_ms']} ms  "
            f"load {'/'.join(f'{x:.2f}' for x in lb)} -> {'/'.join(f'{x:.2f}' for x in la)}"
        )
    for f in result.get("client_floor", []):
        b = f["beyond_latency_ms"]
        lines.append(
            f"    round {f['round']} client floor       {f['requests_per_s']:7.1f} req/s  the "
            f"executor's upstream client alone, first call -> last answer; each call "
            f"{b['mean']} ms beyond the latency (p99 {b['p99']}); mean in flight "
            f"{f['upstream']['mean_in_flight']}, at the max {f['upstream']['share_at_max']:.0%} of the time  load "
            f"{f['load_before'][0]:.2f} -> {f['load_after'][0]:.2f}"
        )
    ratios = result["summary"]["ratios"]
    labels = {
        "requests_per_s": "req/s",
        "cpu_s_per_1000_total": "CPU/1000",
        "peak_memory_mib_total": "peak memory",
        "claim_to_complete_p50_ms": "claim->complete p50",
        "claim_to_complete_p99_ms": "p99",
    }
    for config, rs in ratios.items():
        if not rs:
            continue
        parts = []
        for f, label in labels.items():
            if f in rs:
                s = rs[f]
                spread = "" if s["min"] == s["max"] else f" ({s['min']:.2f}-{s['max']:.2f})"
                parts.append(f"{label} {s['median']:.2f}{spread}")
        lines.append(f"  ratio Cannonade/{config} (same rounds): " + ", ".join(parts))
    for failure in result["failures"]:
        lines.append(f"  FAILED {failure.splitlines()[0]}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--requests", type=int, default=10_000, help="batch size (10000)")
    p.add_argument("--concurrency", type=int, default=64, help="per-model limit, both sides (64)")
    p.add_argument("--runs", type=int, default=2, help="rounds; each side runs once a round (2)")
    p.add_argument("--claim-interval-ms", default="1000,10",
                   help="fusillade claim intervals to run, comma-separated (1000,10)")  # fmt: skip
    p.add_argument("--claim-batch-size", type=int, default=100,
                   help="fusillade claim_batch_size (its default, 100)")  # fmt: skip
    p.add_argument("--pool-size", type=int, default=10,
                   help="fusillade's PgPool max_connections (sqlx's default, 10)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds allowed from in_progress to completed (1800)")  # fmt: skip
    p.add_argument("--start-timeout", type=float, default=600.0,
                   help="seconds allowed from batch create to in_progress (600)")  # fmt: skip
    stack_options(p, keep_db=False)
    args = p.parse_args(argv)
    try:
        args.claim_intervals = [int(x) for x in args.claim_interval_ms.split(",") if x.strip()]
    except ValueError:
        p.error("--claim-interval-ms: comma-separated integers, e.g. 1000,10")
    if not args.claim_intervals or min(args.claim_intervals) < 1:
        p.error("--claim-interval-ms: at least one interval, each >= 1")
    if min(args.requests, args.concurrency, args.runs, args.claim_batch_size, args.pool_size) < 1:
        p.error("--requests, --concurrency, --runs, --claim-batch-size, --pool-size must be >= 1")
    if args.latency_ms < 0:
        p.error("--latency-ms must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = asyncio.run(run(args))
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    save_and_report(
        "peer",
        f"Cannonade vs fusillade 19.0.0 (fake upstream, {args.latency_ms} ms latency)",
        result,
        report(result),
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
