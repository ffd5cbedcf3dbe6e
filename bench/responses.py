"""Requests without a batch (issue 7): flex latency at an idle engine, and what the realtime
proxy adds to a direct upstream call.

    python -m bench.responses [--requests 300] [--in-flight 16] [--latency-ms 0]

Backend and services as in :mod:`bench.baseline` (whose helpers it uses): a fresh database on
CANNONADE_KAFKA / CANNONADE_DATABASE_URL when both are set, else a private stack; one chat model
``bench-chat`` on the fake upstream at ``--latency-ms`` (0). Every call goes through the
unmodified ``openai`` SDK (``AsyncOpenAI``, one client per base URL, so connections are reused
the same way on every path). After a warm-up it runs, in this order:

0. **Idle**: ``--idle-s`` with nothing to do, for each process's idle CPU, which the CPU per
   call figures below leave out.
1. **Realtime, sequential**: N pairs of the same chat completion, one straight to the fake
   upstream (``POST {upstream}/v1/chat/completions``) and one through Cannonade's realtime
   path (``POST {api}/v1/chat/completions``), the order flipped every pair, each timed from
   the call to the parsed answer; p50/p99/max per path and the ratios Cannonade / direct.
2. **Realtime, concurrent**: ``--in-flight`` calls in flight, ``--concurrent-requests`` per
   path split over ``--rounds`` rounds that alternate the two paths; requests/s and latency.
3. **Flex, sequential** (once the projector has caught up, so the engine is idle): N blocking
   ``chat.completions.create(service_tier="flex")`` and N blocking
   ``responses.create(service_tier="flex")``, alternating, each timed submit -> answer;
   p50/p99/max per kind, and where the time goes, from the read model's event times and the
   fake upstream's arrival times.

CPU seconds per process over each phase (services, Kafka, PostgreSQL with a private stack, and
this process: the SDK client), the load average and the fake upstream's counters go to
``bench/results/responses-<timestamp>.json`` with the figures. Nothing is asserted: a failed
call is counted and reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from bench import procs
from bench.baseline import (
    Backend,
    BenchError,
    bench_services,
    close_backend,
    log,
    open_backend,
    run_stack_bench,
    stack_options,
    start_services,
    stop_services,
    wait_projector_caught_up,
)
from compose.services import Services
from projections.api.auth import create_key

MODEL = "bench-chat"
USER = "bench-user"
UPSTREAM_KEY = "local-upstream-key"  # what compose.services configures for every model
MAX_TOKENS = 16
CALL_TIMEOUT_S = 120.0
KEPT_ERRORS = 5  # error messages kept per path
CLIENT = "bench client"  # this process, in the CPU figures

# The flex timeline, one row per request: event times from the read model (created by the API,
# claimed / completed stamped by the gate as it handled each event, projected by the
# projector's commit), as Unix seconds (one host, one clock).
_TIMELINE = """
SELECT id::text AS id, state, retry_attempt,
       extract(epoch FROM created_at) AS created,
       extract(epoch FROM claimed_at) AS claimed,
       extract(epoch FROM completed_at) AS completed,
       extract(epoch FROM projected_at) AS projected
FROM requests WHERE id = ANY($1::uuid[])
"""


# --- figures ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, PostgreSQL's
    ``percentile_cont``)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values_s: Sequence[float]) -> dict[str, float | int | None]:
    """n, p50, p99, max and mean, in milliseconds."""
    if not values_s:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 0.5), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
        "max_ms": round(max(ms), 2),
        "mean_ms": round(sum(ms) / len(ms), 2),
    }


def ratio(a: float | int | None, b: float | int | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 2)


@dataclass
class Lane:
    """One request path's timings and failures within a phase."""

    name: str
    seconds: list[float] = field(default_factory=list)
    failures: int = 0
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0  # concurrent phase: time with this path's calls in flight
    cpu_s: dict[str, float] = field(default_factory=dict)  # concurrent phase: CPU meanwhile
    box_busy_s: float = 0.0  # ... and the whole box's busy CPU

    def failed(self, message: str) -> None:
        self.failures += 1
        if len(self.errors) < KEPT_ERRORS:
            self.errors.append(message)

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {**summary(self.seconds), "failures": self.failures}
        if self.errors:
            out["errors"] = self.errors
        if self.wall_s:
            out["wall_s"] = round(self.wall_s, 3)
            out["requests_per_s"] = round(len(self.seconds) / self.wall_s, 1)
        return out


# --- the calls -------------------------------------------------------------------------------


def messages(i: int) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": f"Say hello to #{i}."}]


Call = Callable[[int], Awaitable[str | None]]  # -> the Cannonade request id, if any


def chat_call(client: AsyncOpenAI, *, flex: bool = False) -> Call:
    async def call(i: int) -> str | None:
        extra: dict[str, Any] = {"service_tier": "flex"} if flex else {}
        answer = await client.chat.completions.create(
            model=MODEL, messages=messages(i), max_tokens=MAX_TOKENS, **extra
        )
        if not answer.choices or not answer.choices[0].message.content:
            raise ValueError(f"an answer without content: {answer.model_dump_json()[:200]}")
        return answer.id.removeprefix("resp_") if answer.id.startswith("resp_") else None

    return call


def responses_call(client: AsyncOpenAI) -> Call:
    async def call(i: int) -> str | None:
        answer = await client.responses.create(
            model=MODEL,
            input=f"Say hello to #{i}.",
            max_output_tokens=MAX_TOKENS,
            service_tier="flex",
        )
        if answer.status != "completed" or not answer.output_text:
            raise ValueError(f"response {answer.id} is {answer.status}")
        return answer.id.removeprefix("resp_")

    return call


@dataclass
class Timed:
    """A flex call: its request id and the wall clock (Unix seconds) at submit and answer."""

    request_id: str
    kind: str
    submitted: float
    answered: float


async def timed(path: Lane, call: Call, i: int, kept: list[Timed] | None = None) -> None:
    submitted = time.time()
    t0 = time.perf_counter()
    try:
        request_id = await call(i)
    except (openai.OpenAIError, ValueError) as exc:
        path.failed(f"{type(exc).__name__}: {str(exc)[:200]}")
        return
    path.seconds.append(time.perf_counter() - t0)
    if kept is not None and request_id is not None:
        kept.append(Timed(request_id, path.name, submitted, time.time()))


async def sequential(pairs: list[tuple[Lane, Call]], n: int, kept: list[Timed] | None) -> None:
    """n rounds of one call per path, one at a time; the order is flipped every round so that
    neither path always runs just after the other."""
    for i in range(n):
        order = pairs if i % 2 == 0 else pairs[::-1]
        for path, call in order:
            await timed(path, call, i, kept)


async def concurrently(
    path: Lane, call: Call, total: int, in_flight: int, first: int, watched: dict[str, int]
) -> None:
    """``total`` calls with ``in_flight`` at a time; adds the wall time and the CPU used
    meanwhile to the path's."""
    next_i = iter(range(first, first + total))

    async def worker() -> None:
        for i in next_i:
            await timed(path, call, i)

    cpu0, box0 = cpu_now(watched), procs.box_busy_s()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(in_flight, total))))
    path.wall_s += time.perf_counter() - t0
    path.box_busy_s += procs.box_busy_s() - box0
    add_to(path.cpu_s, cpu_used(cpu0, cpu_now(watched)))


def shares(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if k < extra else 0) for k in range(parts)]


# --- measurement around each phase -----------------------------------------------------------


def roots(services: Services, backend: Backend) -> dict[str, int]:
    """Every process whose CPU is reported: the services, and Kafka and PostgreSQL with a
    private stack (PostgreSQL as a tree, so every backend counts)."""
    found = {name: proc.pid for name, proc in services.procs.items()}
    found.update(backend.stack_pids)
    return found


def cpu_now(watched: dict[str, int]) -> dict[str, float]:
    """Cumulative CPU seconds of each watched process tree, and of this one (the SDK client,
    every thread)."""
    snap = procs.snapshot()
    out = {
        name: cpu
        for name, root in watched.items()
        if (cpu := procs.tree_cpu_s(root, snap)) is not None
    }
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out[CLIENT] = usage.ru_utime + usage.ru_stime
    return out


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in after if name in before}


def add_to(total: dict[str, float], more: dict[str, float]) -> None:
    for name, seconds in more.items():
        total[name] = total.get(name, 0.0) + seconds


class Phase:
    """Wall time, CPU seconds per process, the box's busy CPU and the load average over one
    phase of the run."""

    def __init__(self, name: str, watched: dict[str, int]) -> None:
        self.name = name
        self.watched = watched
        self.wall_s = 0.0
        self.cpu_s: dict[str, float] = {}
        self.box_busy_s = 0.0
        self.load: list[list[float]] = []

    def __enter__(self) -> Phase:
        log(f"phase: {self.name}")
        self.load.append(procs.loadavg())
        self._box0 = procs.box_busy_s()
        self._cpu0 = cpu_now(self.watched)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self.cpu_s = cpu_used(self._cpu0, cpu_now(self.watched))
        self.box_busy_s = procs.box_busy_s() - self._box0
        self.load.append(procs.loadavg())

    def figures(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 2),
            "cpu_s": {k: round(v, 3) for k, v in sorted(self.cpu_s.items())},
            "box_busy_cpu_s": round(self.box_busy_s, 2),  # every process on the box
            "load_before": self.load[0],
            "load_after": self.load[-1],
        }


def net_cpu_ms_per_call(
    cpu_s: dict[str, float], wall_s: float, idle: dict[str, float], calls: int
) -> dict[str, float]:
    """CPU milliseconds per call of each process, less what it burns idle over as long
    (``idle``: CPU seconds per second, from the idle phase). Negative values are noise."""
    out = {
        name: 1000 * (used - idle.get(name, 0.0) * wall_s) / max(calls, 1)
        for name, used in cpu_s.items()
    }
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


# --- the flex timeline -----------------------------------------------------------------------

SEGMENTS = (
    ("submit -> created", "submitted", "created"),
    ("created -> claimed", "created", "claimed"),
    ("claimed -> upstream", "claimed", "upstream"),
    ("upstream -> completed", "upstream", "completed"),
    ("completed -> projected", "completed", "projected"),
    ("projected -> answered", "projected", "answered"),
)


def upstream_arrivals(upstream_url: str) -> dict[str, float]:
    """When the fake upstream first received each request id (Unix seconds)."""
    with urllib.request.urlopen(f"{upstream_url}/_stats", timeout=60) as resp:
        stats = json.load(resp)
    first: dict[str, float] = {}
    for call in stats.get("calls", []):
        rid = call.get("request_id")
        if rid and rid not in first:
            first[rid] = call["at"]
    return first


def upstream_counts(upstream_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{upstream_url}/_stats", timeout=60) as resp:
        stats = json.load(resp)
    return {"max_in_flight": stats.get("max_in_flight"), "models": stats.get("models", {})}


async def flex_timeline(
    database_url: str, upstream_url: str, kept: list[Timed]
) -> dict[str, dict[str, Any]]:
    """Per kind, each segment's p50/p99/max over the requests whose every time is known."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch(_TIMELINE, [t.request_id for t in kept])
    finally:
        await conn.close()
    arrivals = await asyncio.to_thread(upstream_arrivals, upstream_url)
    by_id = {r["id"]: r for r in rows}
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted({t.kind for t in kept}):
        segments: dict[str, list[float]] = {name: [] for name, _, _ in SEGMENTS}
        incomplete = retried = 0
        for t in (t for t in kept if t.kind == kind):
            row = by_id.get(t.request_id)
            times: dict[str, float | None] = {"submitted": t.submitted, "answered": t.answered}
            if row is not None:
                times |= {k: row[k] for k in ("created", "claimed", "completed", "projected")}
                times["upstream"] = arrivals.get(t.request_id)
                retried += bool(row["retry_attempt"])
            if any(times.get(k) is None for _, a, b in SEGMENTS for k in (a, b)):
                incomplete += 1
                continue
            for name, a, b in SEGMENTS:
                segments[name].append(float(times[b] or 0) - float(times[a] or 0))
        out[kind] = {name: summary(values) for name, values in segments.items()}
        out[kind]["requests without every time"] = {"n": incomplete}
        out[kind]["retried"] = {"n": retried}
    return out


# --- orchestration ---------------------------------------------------------------------------


async def until_idle(backend: Backend, args: argparse.Namespace) -> None:
    """Until the projector has applied everything on its topics (realtime recordings
    included), then ``--settle-s``. The helper's log line counts every record on the topics,
    not only those left to apply."""
    log("waiting for the projector to catch up")
    await wait_projector_caught_up(backend.kafka, backend.database_url, args.start_services_timeout)
    await asyncio.sleep(args.settle_s)


def cores(cpu_s: dict[str, float], wall_s: float) -> dict[str, float]:
    """Cores busy per process: CPU seconds / wall seconds."""
    busy = {name: used / wall_s for name, used in cpu_s.items()} if wall_s else {}
    return {k: round(v, 2) for k, v in sorted(busy.items(), key=lambda kv: -kv[1])}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_root = Path(tempfile.mkdtemp(prefix="cannonade-bench-responses-"))
    backend = await open_backend(run_root, args.private_stack)
    services: Services | None = None
    phases: dict[str, Phase] = {}
    n = args.requests
    try:
        # bench_services reads these: the model's limit is --model-concurrency.
        svc_args = argparse.Namespace(
            concurrency=args.model_concurrency, executors=1, gates=1, latency_ms=args.latency_ms
        )
        services = bench_services(run_root, backend, [MODEL], svc_args)
        started = await start_services(services, backend, args)
        watched = roots(services, backend)
        secret = await create_key(backend.kafka, backend.database_url, USER)
        cannonade = AsyncOpenAI(
            base_url=f"{services.api_url}/v1", api_key=secret, max_retries=0,
            timeout=CALL_TIMEOUT_S,
        )  # fmt: skip
        direct = AsyncOpenAI(
            base_url=f"{services.upstream_url}/v1", api_key=UPSTREAM_KEY, max_retries=0,
            timeout=CALL_TIMEOUT_S,
        )  # fmt: skip
        calls = {
            "direct": chat_call(direct),
            "realtime": chat_call(cannonade),
            "flex chat": chat_call(cannonade, flex=True),
            "flex responses": responses_call(cannonade),
        }
        try:
            log(f"warm-up: {args.warmup} calls per path")
            warm = {name: Lane(name) for name in calls}
            for i in range(args.warmup):
                for name, call in calls.items():
                    await timed(warm[name], call, -1 - i)
            broken = [p for p in warm.values() if args.warmup and p.failures == args.warmup]
            if broken:
                raise BenchError(f"every warm-up call failed on {broken[0].name}: {broken[0].errors}")  # fmt: skip
            await until_idle(backend, args)

            with Phase(f"idle, {args.idle_s:g} s", watched) as phases["idle"]:
                await asyncio.sleep(args.idle_s)
            idle = {k: v / phases["idle"].wall_s for k, v in phases["idle"].cpu_s.items()}

            seq = {name: Lane(name) for name in ("direct", "realtime")}
            with Phase("realtime, sequential", watched) as phases["realtime_sequential"]:
                await sequential([(p, calls[p.name]) for p in seq.values()], n, None)

            conc = {name: Lane(name) for name in ("direct", "realtime")}
            with Phase("realtime, concurrent", watched) as phases["realtime_concurrent"]:
                first = n
                for r, share in enumerate(shares(args.concurrent_requests, args.rounds)):
                    order = list(conc.values())[:: 1 if r % 2 == 0 else -1]
                    for path in order:
                        await concurrently(
                            path, calls[path.name], share, args.in_flight, first, watched
                        )
                    first += share

            await until_idle(backend, args)
            flex = {name: Lane(name) for name in ("flex chat", "flex responses")}
            kept: list[Timed] = []
            with Phase("flex, sequential", watched) as phases["flex_sequential"]:
                await sequential([(p, calls[p.name]) for p in flex.values()], n, kept)
        finally:
            await cannonade.close()
            await direct.close()
        timeline = await flex_timeline(backend.database_url, services.upstream_url, kept)
        upstream = await asyncio.to_thread(upstream_counts, services.upstream_url)
    finally:
        if services is not None:
            await stop_services(services)
        await close_backend(backend, args.keep_db)

    def net(phase: Phase, calls: int) -> dict[str, float]:
        return net_cpu_ms_per_call(phase.cpu_s, phase.wall_s, idle, calls)

    s_direct, s_rt = seq["direct"].figures(), seq["realtime"].figures()
    c_direct, c_rt = conc["direct"].figures(), conc["realtime"].figures()
    for lane, fig in ((conc["direct"], c_direct), (conc["realtime"], c_rt)):
        fig["cores_busy"] = cores(lane.cpu_s, lane.wall_s)
        fig["box_cores_busy"] = round(lane.box_busy_s / lane.wall_s, 2) if lane.wall_s else None
        fig["cpu_ms_per_call_net"] = net_cpu_ms_per_call(
            lane.cpu_s, lane.wall_s, idle, len(lane.seconds)
        )
    flex_calls = sum(len(lane.seconds) for lane in flex.values())
    failures = sum(p.failures for group in (seq, conc, flex) for p in group.values())
    ph = phases
    return {
        "benchmark": "responses",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": {
            "requests": n,
            "warmup": args.warmup,
            "in_flight": args.in_flight,
            "concurrent_requests": args.concurrent_requests,
            "rounds": args.rounds,
            "upstream_latency_ms": args.latency_ms,
            "model_concurrency": args.model_concurrency,
            "idle_s": args.idle_s,
            "backend": "private stack" if backend.stack_dir else "external",
            "services_start_s": round(started.start_s, 2),
            "cpus": os.cpu_count(),
        },
        "figures": {
            "output_ok": failures == 0,
            "failures": failures,
            "realtime_sequential": {
                "direct": s_direct,
                "cannonade": s_rt,
                "ratio_p50": ratio(s_rt["p50_ms"], s_direct["p50_ms"]),
                "ratio_p99": ratio(s_rt["p99_ms"], s_direct["p99_ms"]),
                "added_p50_ms": _minus(s_rt["p50_ms"], s_direct["p50_ms"]),
                "added_p99_ms": _minus(s_rt["p99_ms"], s_direct["p99_ms"]),
                # one direct and one Cannonade call: upstream and client CPU serve both
                "cpu_ms_per_pair_net": net(ph["realtime_sequential"], n),
            },
            "realtime_concurrent": {
                "direct": c_direct,
                "cannonade": c_rt,
                "ratio_p50": ratio(c_rt["p50_ms"], c_direct["p50_ms"]),
                "ratio_p99": ratio(c_rt["p99_ms"], c_direct["p99_ms"]),
                "ratio_requests_per_s": ratio(
                    c_rt.get("requests_per_s"), c_direct.get("requests_per_s")
                ),
            },
            "flex_sequential": {name: p.figures() for name, p in flex.items()},
            "flex_cpu_ms_per_call_net": net(ph["flex_sequential"], flex_calls),
            "flex_timeline": timeline,
        },
        "idle_cores_busy": {k: round(v, 3) for k, v in sorted(idle.items())},
        "phases": {name: phase.figures() for name, phase in phases.items()},
        "load_before": ph["realtime_sequential"].load[0],
        "load_after": ph["flex_sequential"].load[-1],
        "upstream": upstream,
        "warmup": {name: p.figures() for name, p in warm.items()},
        "logs": str(run_root / "services" / "logs"),
    }


def _minus(a: float | int | None, b: float | int | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


# --- report ----------------------------------------------------------------------------------


def _ms(s: dict[str, Any]) -> str:
    if not s.get("n"):
        return "no successful calls"
    return f"p50 {s['p50_ms']:7.1f}  p99 {s['p99_ms']:7.1f}  max {s['max_ms']:7.1f} ms"


def _top(per_process: dict[str, float], unit: str, at_least: float, most: int = 6) -> str:
    """The largest entries, then the total."""
    shown = [f"{k} {v:.2f}" for k, v in per_process.items() if v >= at_least][:most]
    total = sum(per_process.values())
    return f"{', '.join(shown)} (all ours {total:.2f}) {unit}"


def report(result: dict[str, Any]) -> str:
    f, p, ph = result["figures"], result["params"], result["phases"]
    seq, conc = f["realtime_sequential"], f["realtime_concurrent"]
    load = (
        " ".join(f"{x:.2f}" for x in result["load_before"])
        + " -> "
        + " ".join(f"{x:.2f}" for x in result["load_after"])
    )
    idle = ph["idle"]
    box_idle = idle["box_busy_cpu_s"] / idle["wall_s"]
    ours_idle = sum(result["idle_cores_busy"].values())
    rows: list[tuple[str, str]] = [
        ("calls", f"{p['requests']} sequential per path after {p['warmup']} warm-up; "
                  f"upstream latency {p['upstream_latency_ms']} ms; {p['backend']}"),
        ("load avg before -> after", f"{load} ({p['cpus']} CPUs)"),
        ("box while the engine idled", f"{box_idle:.2f} cores busy, {ours_idle:.2f} of them "
                                       f"ours (kafka {result['idle_cores_busy'].get('kafka', 0):.2f})"),
        ("", ""),
        ("realtime, sequential", "one call each way per pair, order flipped every pair"),
        ("  direct to upstream", _ms(seq["direct"])),
        ("  through Cannonade", _ms(seq["cannonade"])),
        ("  Cannonade / direct", f"p50 {seq['ratio_p50']}  p99 {seq['ratio_p99']}  (adds "
                                 f"{seq['added_p50_ms']:.1f} ms at p50, "
                                 f"{seq['added_p99_ms']:.1f} ms at p99)"),
        ("  CPU per pair, net of idle", _top(seq["cpu_ms_per_pair_net"], "ms", 0.1)),
        ("", ""),
        (f"realtime, {p['in_flight']} in flight", f"{p['concurrent_requests']} calls per path "
                                                   f"in {p['rounds']} alternating rounds"),
    ]  # fmt: skip
    for label, side in (("  direct to upstream", "direct"), ("  through Cannonade", "cannonade")):
        c = conc[side]
        rows.append((label, f"{c.get('requests_per_s', 0):7.1f} req/s  " + _ms(c)))
        busy = _top(c["cores_busy"], "", 0.05).rstrip()
        rows.append(("    cores busy", f"{busy}; the whole box {c['box_cores_busy']}"))
    rows += [
        ("  Cannonade / direct", f"req/s {conc['ratio_requests_per_s']}  "
                                 f"p50 {conc['ratio_p50']}  p99 {conc['ratio_p99']}"),
        ("", ""),
        ("flex, sequential", "submit -> answer; chat and responses alternating"),
    ]  # fmt: skip
    for name, s in f["flex_sequential"].items():
        rows.append((f"  {name}", _ms(s)))
    rows.append(("  CPU per call, net of idle", _top(f["flex_cpu_ms_per_call_net"], "ms", 0.1)))
    for kind, segments in f["flex_timeline"].items():
        rows.append((f"  {kind}: where the time goes", "p50 / p99 per segment"))
        for name, s in segments.items():
            if "p50_ms" in s and s["n"]:
                rows.append((f"    {name}", f"{s['p50_ms']:7.1f} / {s['p99_ms']:7.1f} ms"))
            elif s["n"]:
                rows.append((f"    {name}", str(s["n"])))
    rows += [("", ""), ("failed calls", str(f["failures"]))]
    for group in (seq, conc, f["flex_sequential"]):
        for name, s in group.items():
            if isinstance(s, dict) and s.get("errors"):
                rows.append((f"  {name}", "; ".join(s["errors"])))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {value}".rstrip() for label, value in rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.responses", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--requests", type=int, default=300,
                   help="sequential calls per path and per flex kind (300)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=5, help="uncounted calls per path first (5)")
    p.add_argument("--in-flight", type=int, default=16,
                   help="calls in flight in the concurrent realtime phase (16)")  # fmt: skip
    p.add_argument("--concurrent-requests", type=int, default=None,
                   help="calls per path in the concurrent phase (4 x --requests)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=4,
                   help="alternating rounds of the concurrent phase (4)")  # fmt: skip
    p.add_argument("--model-concurrency", type=int, default=64,
                   help="the model's concurrency limit in the engine (64)")  # fmt: skip
    p.add_argument("--idle-s", type=float, default=10.0,
                   help="idle window measured for each process's idle CPU (10)")  # fmt: skip
    p.add_argument("--settle-s", type=float, default=2.0,
                   help="pause once the projector caught up, before a phase (2)")  # fmt: skip
    stack_options(p)
    args = p.parse_args(argv)
    if args.concurrent_requests is None:
        args.concurrent_requests = 4 * args.requests
    if min(args.requests, args.in_flight, args.concurrent_requests, args.rounds) < 1:
        p.error("--requests, --in-flight, --concurrent-requests and --rounds must be >= 1")
    if args.warmup < 0 or args.latency_ms < 0 or args.model_concurrency < 1 or args.idle_s <= 0:
        p.error("--warmup, --latency-ms >= 0, --model-concurrency >= 1, --idle-s > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stack_bench(
        "responses",
        f"Cannonade requests without a batch (fake upstream, {args.latency_ms} ms latency)",
        run,
        report,
        args,
    )


if __name__ == "__main__":
    sys.exit(main())
