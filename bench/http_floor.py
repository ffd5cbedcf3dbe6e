"""The HTTP path's floor: the executor's own upstream client with no engine around it.

    python -m bench.http_floor [--requests 5000] [--concurrency 64] [--latency-ms 200]
                               [--rounds 2]

N calls through ``--concurrency`` lanes, each lane calling again as soon as its last call
returned (work-conserving, like the executor's lanes), against the fake upstream that every
benchmark uses, started as ``bench.peer`` starts it. The client is the executor's
(``UpstreamClient`` over ``AiohttpTransport``, on uvloop as the workers run), so the figure is
what any engine built on it can reach on this box: no Kafka, no gate, no claims, no polling.

With ``--against URL`` it makes one lockstep run against a fake upstream already running and
prints its figures as one JSON line: ``bench.peer --latency-ms L`` runs it so after each round.

Each round runs twice, alternating: **lockstep** (every lane starts at once, as a batch's first
wave does) and **staggered** (lane i starts i/C of one latency later), because a fake upstream
with one fixed latency keeps lockstep lanes in step for the whole run, and a burst of C calls
queues in both event loops on every cycle. Prints, per round and mode: requests/s (N / first
call -> last answer), the ceiling C / latency, each call's time beyond the latency (mean, p50,
p90, p99), the time from a call's answer to its lane's next call, the CPU seconds of this
process and of the fake upstream, and the load average before and after. Figures also go to
``bench/results/http_floor-<timestamp>.json``.
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
from pathlib import Path
from typing import Any

import uvloop

from bench import procs
from bench.baseline import (
    BenchError,
    cpu_between,
    cpu_seconds,
    log,
    nearest_rank,
    save_and_report,
)
from bench.upstream import Upstream
from streams.execution.client import AiohttpTransport, UpstreamCall, UpstreamClient
from streams.execution.outcome import Failure

BODY = (
    b'{"model": "bench-chat", "messages": [{"role": "user", "content": "Say hello, request %d."}]}'
)
MODES = ("lockstep", "staggered")


async def one_run(
    upstream_url: str, n: int, concurrency: int, latency_ms: int, stagger: bool
) -> dict[str, Any]:
    """N calls through ``concurrency`` lanes, each taking the next call as its last returns."""
    client = UpstreamClient(transport := AiohttpTransport())
    taken = 0
    calls: list[float] = []  # each call's seconds
    turns: list[float] = []  # answer -> the same lane's next call

    async def lane(i: int) -> None:
        nonlocal taken
        if stagger:
            await asyncio.sleep(latency_ms / 1000 * i / concurrency)
        answered = None
        while taken < n:
            number, taken = taken, taken + 1
            call = UpstreamCall(
                request_id=f"floor-{number}", endpoint=upstream_url,
                path="/v1/chat/completions", method="POST", body=BODY % number,
                api_key="local-upstream-key",
            )  # fmt: skip
            sent = time.perf_counter()
            if answered is not None:
                turns.append(sent - answered)
            outcome = await client.execute(call)
            answered = time.perf_counter()
            if isinstance(outcome, Failure):
                raise BenchError(f"call {number} failed: {outcome.reason!r}")
            calls.append(answered - sent)

    cpu = procs.self_cpu_s()
    try:
        started = time.perf_counter()
        await asyncio.gather(*(lane(i) for i in range(concurrency)))
        wall = time.perf_counter() - started
    finally:
        await transport.close()
    cpu = procs.self_cpu_s() - cpu
    over = [c * 1000 - latency_ms for c in calls]
    return {
        "mode": MODES[stagger],
        "requests_per_s": round(n / wall, 1),
        "wall_s": round(wall, 3),
        "beyond_latency_ms": _stats(over),
        "turnaround_ms": _stats([t * 1000 for t in turns]),
        "client_cpu_s": round(cpu, 2),
    }


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "mean": round(statistics.fmean(values), 2),
        **{f"p{round(q * 100)}": round(nearest_rank(values, q), 2) for q in (0.5, 0.9, 0.99)},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="cannonade-bench-floor-"))
    upstream = Upstream(root, args.latency_ms)
    runs: list[dict[str, Any]] = []
    try:
        for round_no in range(1, args.rounds + 1):
            for stagger in (False, True):
                upstream.ensure()
                upstream.reset()
                await asyncio.sleep(args.pause)
                load_before = procs.loadavg()
                fake = {"fake upstream": upstream.proc.pid}
                cpu_fake = cpu_seconds(fake)
                one = await one_run(
                    upstream.url, args.requests, args.concurrency, args.latency_ms, stagger
                )
                one["round"] = round_no
                one["cpu_s"] = {
                    "client": one.pop("client_cpu_s"),
                    **cpu_between(cpu_fake, cpu_seconds(fake), digits=2),
                }
                one["upstream"] = upstream.stats()
                one["load_before"], one["load_after"] = load_before, procs.loadavg()
                log(f"round {round_no} {one['mode']}: {one['requests_per_s']} req/s")
                runs.append(one)
    finally:
        upstream.stop()
    return {
        "benchmark": "http_floor",
        "params": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "upstream_latency_ms": args.latency_ms,
            "rounds": args.rounds,
            "ceiling_requests_per_s": round(args.concurrency * 1000 / args.latency_ms, 1),
            "cpus": os.cpu_count(),
        },
        "runs": runs,
        "logs": str(root),
    }


def report(result: dict[str, Any]) -> str:
    p = result["params"]
    lines = [
        f"  {p['requests']} calls, {p['concurrency']} lanes, fake upstream at "
        f"{p['upstream_latency_ms']} ms: ceiling {p['ceiling_requests_per_s']} req/s"
    ]
    for r in result["runs"]:
        b, t, c = r["beyond_latency_ms"], r["turnaround_ms"], r["cpu_s"]
        lines.append(
            f"  round {r['round']} {r['mode']:<9}  {r['requests_per_s']:7.1f} req/s; call beyond "
            f"latency mean {b['mean']} p50 {b['p50']} p90 {b['p90']} p99 {b['p99']} ms; answer "
            f"-> next call mean {t.get('mean')} ms; CPU client {c['client']} s, fake "
            f"{c['fake upstream']} s; in flight mean {r['upstream']['mean_in_flight']}, max "
            f"{r['upstream']['max_in_flight']} ({r['upstream']['share_at_max']:.0%} of the time); load "
            f"{' '.join(map(str, r['load_before']))} -> {' '.join(map(str, r['load_after']))}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=5000, help="calls per run (5000)")
    p.add_argument("--concurrency", type=int, default=64, help="lanes (64)")
    p.add_argument("--latency-ms", type=int, default=200, help="fake upstream latency (200)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of both modes (2)")
    p.add_argument("--pause", type=float, default=2.0, help="quiet before each run, s (2)")
    p.add_argument("--against", metavar="URL", default=None,
                   help="one lockstep run against this running fake upstream, its figures as "
                        "one JSON line on stdout (bench.peer's client floor)")  # fmt: skip
    args = p.parse_args(argv)
    if args.latency_ms <= 0:
        p.error("--latency-ms must be positive (the ceiling is concurrency / latency)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.against is not None:
        one = uvloop.run(
            one_run(args.against, args.requests, args.concurrency, args.latency_ms, False)
        )
        print(json.dumps(one))
        return 0
    try:
        result = uvloop.run(run(args))
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    save_and_report(
        "http_floor", "The executor's HTTP client alone (no engine)", result, report(result)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
