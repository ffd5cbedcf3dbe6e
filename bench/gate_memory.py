"""Claim gate: memory and recovery grow with live work only.

    python -m bench.gate_memory [--pending 100000,1000000] [--ticks 200] [--run 200000]

In process, no broker: a :class:`streams.gate.core.Gate` on a plain dict state, driven through
``Gate.handle`` with a synthetic clock, model ``m`` live with ``--limit`` (64), the backlog
spread over ``--batches`` (100) batches of ``--owners`` (20) owners, each populated as the
commands agent populates it (one ``PendingRequests`` per batch: its facts, one line range and
its file's chunk refs, ``bench.baseline``'s lines per 512 KiB chunk). It prints:

1. **Memory for N pending requests**, for each N of ``--pending``: the state mapping's records
   by prefix and their total key + value bytes, and tracemalloc (a traced build: bytes still
   held by the gate once built, state and indexes; and the transient peak while populating),
   in bytes per pending request and in total. The ``--limit`` rows the first population
   claims stay in flight (``R:`` records).
2. **One claim cycle**: with ``--flex`` batchless (flex) rows pending besides the batches
   (owners round-robin, created over the last 50 minutes, so their deadlines spread and come
   before the batches'), ``handle(GateTick)`` after ``--claim-size`` slots were freed (an
   executor report handled with the model's limit set to 0 for that call, so that the tick is
   what claims), and ``handle(ExecutionReport)`` ending ``--claim-size`` calls (ends them and
   claims as many), p50/p99/max over ``--ticks`` samples at the largest N and at N/10,
   sampled alternately so other load hits both alike. A p50 ratio near 1 means a cycle's cost
   does not grow with the backlog. With ``--model-state coming`` the model is not live from
   the start (scaled to zero): its rows are populated and submitted to a model whose cycles
   trickle rows through the leaky bucket, and "populating it" shows what each input's cycle
   costs against that backlog.
3. **A full run** of ``--run`` requests: populated at once, every claim answered by a
   simulated executor in reports of 1..``--report-items`` finished calls (``--retry-rate`` of
   them retried 1 s later, ``--fail-rate`` failed, ``--slow-rate`` reported started first), a
   tick every simulated second, until every request ended. It prints the state at its largest
   (mid-run) and after the run (records, bytes; no ``B:``/``R:`` record is left for finished
   batches), the time to ``rebuild()`` a fresh Gate from each, the lifecycle check (each
   request ended once), records published and the largest one, and the handle times.

Figures also go to ``bench/results/gate_memory-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
import tracemalloc
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.baseline import ENDPOINT, build_jsonl, nearest_rank, save_and_report
from projections.api.files import CHUNK_BYTES
from schemas import codec, ids
from schemas.bodies import BodyRef
from schemas.events import (
    BatchFacts,
    BatchlessFacts,
    ChunkRef,
    DispatchBatch,
    DispatchItem,
    ExecutionReport,
    FinishedItem,
    GateInput,
    GateTick,
    LineRange,
    ModelFilterAppended,
    PendingRequests,
    RequestCanceled,
    RequestClaimed,
    RequestCompleted,
    RequestFailed,
    RequestsPending,
    RequestSubmitted,
    RequestTransitions,
    SourceMark,
    StartedItem,
)
from streams.emit import Out
from streams.gate.core import Gate

MODEL = "m"
WINDOW = timedelta(hours=24)
T0 = datetime(2026, 1, 1, tzinfo=UTC)  # synthetic clock: runs are reproducible
SAMPLE_STEP = timedelta(milliseconds=10)  # per claim-cycle sample: 200 samples = 2 s
REPORT_STEP = timedelta(milliseconds=2)  # per report in the full run (the reporter's delay)
TICK_EVERY = timedelta(seconds=1)  # streams.agents.gate.TICK_INTERVAL_S
RETRY_AFTER = timedelta(seconds=1)
WORKER = "bench-executor"
PREFIXES = ("B:", "R:", "W:", "K:", "M:")


def lines_per_chunk() -> int:
    """Lines per uploaded chunk for bench.baseline's lines (the API cuts chunks at
    CHUNK_BYTES of bodies)."""
    sample = build_jsonl(1000, ["bench-chat"]).splitlines()
    sizes = [len(json.dumps(json.loads(line)["body"], separators=(",", ":"))) for line in sample]
    return max(1, int(CHUNK_BYTES // statistics.fmean(sizes)))


LINES_PER_CHUNK = lines_per_chunk()


# --- inputs ------------------------------------------------------------------------------


def populations(total: int, batches: int, owners: int, tag: str) -> Iterator[PendingRequests]:
    """``total`` rows over ``batches`` batches as the commands agent populates them: one
    PendingRequests per batch and model, one line range, the file's chunk refs."""
    per, extra = divmod(total, batches)
    offset = 0
    for b in range(batches):
        rows = per + (1 if b < extra else 0)
        batch_id = ids.derived("bench-batch", tag, b)
        facts = BatchFacts(
            batch_id=batch_id,
            file_id=ids.derived("bench-file", tag, b),
            owner=f"user-{b % owners:02d}",
            created_at=T0,
            deadline=T0 + WINDOW,
            window_class="24h",
            window_s=WINDOW.total_seconds(),
            path=ENDPOINT,
            headers={  # the default batch_metadata_fields
                "id": batch_id,
                "endpoint": ENDPOINT,
                "created_at": T0.isoformat(),
                "completion_window": "24h",
            },
        )
        chunks = []
        for first in range(0, rows, LINES_PER_CHUNK):
            chunks.append(ChunkRef(first, min(LINES_PER_CHUNK, rows - first), 0, offset))
            offset += 1
        yield PendingRequests(
            event_id=ids.event_id("pending", batch_id, MODEL),
            occurred_at=T0,
            source=SourceMark(0, b, 0),
            batch=facts,
            model=MODEL,
            ranges=[LineRange(0, rows)],
            chunks=chunks,
        )


class Tracked(dict[str, bytes]):
    """A state mapping that notes the keys written or deleted: the changelog records one
    handle produces (the agent's WriteBehind sends each touched key once per input)."""

    def __init__(self) -> None:
        super().__init__()
        self.touched: set[str] = set()

    def __setitem__(self, key: str, value: bytes) -> None:
        self.touched.add(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.touched.add(key)
        super().__delitem__(key)

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            self.touched.add(key)
        return super().pop(key, *default)

    def drain(self) -> int:
        n = len(self.touched)
        self.touched.clear()
        return n


def new_gate(limits: dict[str, int], state: dict[str, bytes] | None = None) -> Gate:
    return Gate({} if state is None else state, limits, "bench-gate")


def dispatched(outs: list[Out]) -> list[DispatchItem]:
    return [item for o in outs if isinstance(o.value, DispatchBatch) for item in o.value.items]


def report(
    at: datetime,
    finished: list[FinishedItem],
    started: list[StartedItem] | None = None,
) -> ExecutionReport:
    return ExecutionReport(
        event_id=ids.new_id(),
        occurred_at=at,
        worker_id=WORKER,
        model=MODEL,
        started=started or [],
        finished=finished,
    )


def completed(item: DispatchItem) -> FinishedItem:
    return FinishedItem(
        request_id=item.request_id, claim_id=item.claim_id, result="completed", status=200,
        size=320,
    )  # fmt: skip


# --- figures -----------------------------------------------------------------------------


def state_figures(state: dict[str, bytes]) -> dict[str, Any]:
    """Records and key + value bytes (UTF-8 keys, as the changelog holds them) by prefix."""
    by: dict[str, dict[str, int]] = {p: {"records": 0, "bytes": 0} for p in PREFIXES}
    for key, value in state.items():
        slot = by.setdefault(key[:2], {"records": 0, "bytes": 0})
        slot["records"] += 1
        slot["bytes"] += len(key.encode()) + len(value)
    return {
        "records": sum(s["records"] for s in by.values()),
        "bytes": sum(s["bytes"] for s in by.values()),
        "by_prefix": by,
    }


def summary(samples: list[float]) -> dict[str, Any]:
    return {
        "samples": len(samples),
        "p50_ms": round(nearest_rank(samples, 0.5), 3),
        "p99_ms": round(nearest_rank(samples, 0.99), 3),
        "max_ms": round(max(samples), 3),
    }


def index_figures(gate: Gate) -> dict[str, int]:
    """Sizes of the gate's derived indexes."""
    models = gate.models.values()
    return {
        "batches": sum(len(m.batches) for m in models),
        "returned": sum(len(b.returned) for m in models for b in m.batches.values()),
        "delayed": sum(len(m.delayed) for m in models),
        "in_flight": sum(len(m.in_flight) for m in models),
        "loose": sum(len(m.loose) for m in models),
        "owners_active": len(gate.owner_active),
        "buckets": sum(len(pairs) for pairs in gate.buckets.cooling.values()),
    }


# --- 1. memory for N pending -------------------------------------------------------------


@dataclass
class Built:
    pending: int
    gate: Gate
    limits: dict[str, int]  # the gate's own mapping: a sample sets it to 0 for one call
    limit: int
    in_flight: deque[DispatchItem]
    ingest_s: float
    largest_record_bytes: dict[str, int]  # what populating published
    claimed: int = 0  # during the claim-cycle samples
    # milliseconds per handle: wall (perf_counter) and this thread's CPU (thread_time), which
    # time spent descheduled by other processes on a shared box does not inflate
    tick: list[float] = field(default_factory=list)
    tick_cpu: list[float] = field(default_factory=list)
    report: list[float] = field(default_factory=list)
    report_cpu: list[float] = field(default_factory=list)

    def timed(self, kind: str, message: GateInput, now: datetime) -> None:
        c, t = time.thread_time(), time.perf_counter()
        outs = self.gate.handle(message, now)
        wall, cpu = time.perf_counter() - t, time.thread_time() - c
        getattr(self, kind).append(wall * 1000)
        getattr(self, f"{kind}_cpu").append(cpu * 1000)
        claimed = dispatched(outs)
        self.in_flight.extend(claimed)
        self.claimed += len(claimed)


def build(n: int, args: argparse.Namespace) -> Built:
    limits = {MODEL: args.limit}
    gate = new_gate(limits)
    if args.model_state != "live":
        state = ModelFilterAppended(
            event_id=ids.event_id("state", n), occurred_at=T0, model=MODEL, state=args.model_state
        )
        gate.handle(state, T0)
    in_flight: deque[DispatchItem] = deque()
    spent = 0.0
    largest: dict[str, int] = {}
    for message in populations(n, args.batches, args.owners, f"n{n}"):
        t = time.perf_counter()
        outs = gate.handle(message, T0)
        spent += time.perf_counter() - t
        in_flight.extend(dispatched(outs))
        for out in outs:  # encoded as the agent publishes it
            kind = type(out.value).__name__
            largest[kind] = max(largest.get(kind, 0), len(codec.encode(out.value)))
    for i in range(args.flex):
        at = T0 - timedelta(seconds=i % 3000)
        submitted = RequestSubmitted(
            event_id=ids.event_id("flex", n, i), occurred_at=T0, source=SourceMark(1, i, 0),
            request_id=ids.derived("bench-flex", n, i), model=MODEL, body=BodyRef(1, i),
            facts=BatchlessFacts(
                owner=f"user-{i % args.owners:02d}", path=ENDPOINT, service_tier="flex",
                created_at=at, deadline=at + timedelta(hours=1),
            ),
        )  # fmt: skip
        t = time.perf_counter()
        in_flight.extend(dispatched(gate.handle(submitted, T0)))
        spent += time.perf_counter() - t
    return Built(n, gate, limits, args.limit, in_flight, spent, largest)


def traced_build(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Bytes the gate holds once N rows are pending (state and indexes), and the transient
    peak while populating (the lifecycle records a population publishes are O(its rows))."""
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    limits = {MODEL: args.limit}
    gate = new_gate(limits)
    for message in populations(n, args.batches, args.owners, f"traced{n}"):
        gate.handle(message, T0)
    gc.collect()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    figures = {
        "traced_bytes": held - before,
        "traced_bytes_per_pending": round((held - before) / n, 3),
        "traced_peak_bytes": peak - before,
        "state": state_figures(gate.state),  # type: ignore[arg-type]
        "indexes": index_figures(gate),
    }
    del gate
    gc.collect()
    return figures


# --- 2. one claim cycle ------------------------------------------------------------------


def sample(built: Built, i: int, k: int) -> None:
    """Free k slots then time the tick that claims them; then time a report ending k calls
    (which claims k more)."""
    gate, limits = built.gate, built.limits
    now = T0 + (i + 1) * SAMPLE_STEP
    ending = [built.in_flight.popleft() for _ in range(min(k, len(built.in_flight)))]
    limits[MODEL] = 0  # the report frees the slots; its own claim cycle claims nothing
    gate.handle(report(now, [completed(d) for d in ending]), now)
    limits[MODEL] = built.limit
    built.timed("tick", GateTick(event_id=ids.new_id(), occurred_at=now, model=MODEL), now)
    ending = [built.in_flight.popleft() for _ in range(min(k, len(built.in_flight)))]
    built.timed("report", report(now, [completed(d) for d in ending]), now)


def claim_cycles(gates: list[Built], args: argparse.Namespace) -> None:
    for i in range(args.ticks):
        for built in gates:
            sample(built, i, args.claim_size)


# --- 3. a full run -----------------------------------------------------------------------


@dataclass
class RunStats:
    reports: int = 0
    ticks: int = 0
    claims: int = 0
    ended: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    records: Counter[str] = field(default_factory=Counter)
    changelog: int = 0
    cpu_s: float = 0.0  # this thread's CPU inside handle
    largest_record: dict[str, int] = field(default_factory=dict)
    handle_ms: dict[str, list[float]] = field(default_factory=dict)

    def time(self, kind: str, ms: float) -> None:
        self.handle_ms.setdefault(kind, []).append(ms)

    def publish(self, outs: list[Out]) -> None:
        for out in outs:
            kind = type(out.value).__name__
            self.records[kind] += 1
            size = len(codec.encode(out.value))
            self.largest_record[kind] = max(self.largest_record.get(kind, 0), size)
            if isinstance(out.value, RequestTransitions):
                for event in out.value.events:
                    name = type(event).__name__
                    if isinstance(event, RequestsPending):
                        self.events[name] += len(event.items)
                        continue
                    self.events[name] += 1
                    if isinstance(event, RequestClaimed):
                        self.claims += 1
                    if isinstance(event, RequestCompleted | RequestFailed | RequestCanceled):
                        self.ended[event.request_id] += 1


def timed(gate: Gate, message: GateInput, now: datetime, stats: RunStats, kind: str) -> list[Out]:
    c, t = time.thread_time(), time.perf_counter()
    outs = gate.handle(message, now)
    stats.time(kind, (time.perf_counter() - t) * 1000)
    stats.cpu_s += time.thread_time() - c
    stats.publish(outs)
    assert isinstance(gate.state, Tracked)
    stats.changelog += gate.state.drain()
    return outs


def time_rebuild(state: dict[str, bytes], limits: dict[str, int], repeats: int) -> dict[str, Any]:
    samples = []
    for _ in range(repeats):
        gate = new_gate(limits, dict(state))
        t = time.perf_counter()
        gate.rebuild()
        samples.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": round(nearest_rank(samples, 0.5), 3), "max_ms": round(max(samples), 3)}


def full_run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    limits = {MODEL: args.limit}
    state = Tracked()
    gate = new_gate(limits, state)
    stats = RunStats()
    queue: deque[DispatchItem] = deque()  # claims the executor holds, in dispatch order
    slow: dict[str, DispatchItem] = {}  # running long enough to be reported started
    now, next_tick = T0, T0 + TICK_EVERY
    peak_len = 0
    peak: tuple[dict[str, bytes], dict[str, int], datetime] = ({}, {}, T0)
    peak_ended = 0
    t_start = time.perf_counter()

    def take(outs: list[Out]) -> None:
        for item in dispatched(outs):
            queue.append(item)
            if rng.random() < args.slow_rate:
                slow[item.claim_id] = item

    for message in populations(args.run, args.batches, args.owners, "run"):
        take(timed(gate, message, now, stats, "PendingRequests"))
    while True:
        if queue:
            size = rng.randint(1, args.report_items)
            finished = []
            for _ in range(min(size, len(queue))):
                item = queue.popleft()
                slow.pop(item.claim_id, None)
                draw = rng.random()
                if draw < args.retry_rate:
                    finished.append(FinishedItem(
                        request_id=item.request_id, claim_id=item.claim_id, result="retry",
                        status=429, error_type="RetriableHttpStatus",
                        not_before=now + RETRY_AFTER,
                    ))  # fmt: skip
                elif draw < args.retry_rate + args.fail_rate:
                    finished.append(FinishedItem(
                        request_id=item.request_id, claim_id=item.claim_id, result="failed",
                        status=400, size=180, error_type="NonRetriableHttpStatus",
                    ))  # fmt: skip
                else:
                    finished.append(completed(item))
            started = [StartedItem(i.request_id, i.claim_id) for i in slow.values()]
            slow.clear()
            take(timed(gate, report(now, finished, started), now, stats, "ExecutionReport"))
            stats.reports += 1
            now += REPORT_STEP
        elif any(k[:2] in ("B:", "R:") for k in state):
            now = next_tick  # nothing running: only a retry's not_before is left to wait for
        else:
            break
        if now >= next_tick:
            tick = GateTick(event_id=ids.new_id(), occurred_at=now, model=MODEL)
            take(timed(gate, tick, now, stats, "GateTick"))
            stats.ticks += 1
            next_tick += TICK_EVERY
        if len(state) > peak_len:
            peak_len, peak = len(state), (dict(state), index_figures(gate), now)
            peak_ended = len(stats.ended)
        if stats.reports > 50 * args.run + 1000:
            raise RuntimeError("the run does not end: requests are left behind")
    wall_s = time.perf_counter() - t_start

    peak_state, peak_indexes, peak_at = peak
    twice = sum(1 for n in stats.ended.values() if n > 1)
    return {
        "requests": args.run,
        "ended_once": len(stats.ended) == args.run and twice == 0,
        "ended": len(stats.ended),
        "ended_twice": twice,
        "events": dict(stats.events),
        "claims": stats.claims,
        "reports": stats.reports,
        "report_items_mean": round(stats.claims / max(stats.reports, 1), 2),
        "ticks": stats.ticks,
        "simulated_s": round((now - T0).total_seconds(), 1),
        "wall_s": round(wall_s, 2),
        "gate_handle_wall_s": round(sum(sum(v) for v in stats.handle_ms.values()) / 1000, 2),
        "gate_handle_cpu_s": round(stats.cpu_s, 2),
        "gate_cpu_us_per_request": round(stats.cpu_s / args.run * 1e6, 1),
        "handle": {kind: summary(v) for kind, v in stats.handle_ms.items()},
        "records_published": dict(stats.records),
        "records_per_request": {
            **{k: round(v / args.run, 3) for k, v in stats.records.items()},
            "changelog": round(stats.changelog / args.run, 3),
        },
        "largest_record_bytes": stats.largest_record,
        "peak": {
            "at_s": round((peak_at - T0).total_seconds(), 3),
            "requests_ended_by_then": peak_ended,
            "state": state_figures(peak_state),
            "indexes": peak_indexes,
            "rebuild": time_rebuild(peak_state, limits, args.rebuilds),
        },
        "after": {
            "state": state_figures(state),
            "keys": sorted(state)[:10],
            "indexes": index_figures(gate),
            "rebuild": time_rebuild(state, limits, args.rebuilds),
        },
    }


# --- orchestration and report ------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    # Warm up (imports, codec buffers, caches) so the traced figures hold the gate only.
    traced_build(args.batches, args)
    memory = {n: traced_build(n, args) for n in args.pending}

    top = max(args.pending)
    small = max(top // 10, args.batches)
    gates = [build(n, args) for n in (top, small)]
    claim_cycles(gates, args)
    cycles: dict[str, Any] = {}
    for built in gates:
        cycles[str(built.pending)] = {
            # the flex rows too: their submissions are in ingest_s
            "ingest_rows_per_s": round((built.pending + args.flex) / built.ingest_s),
            "largest_record_bytes": built.largest_record_bytes,
            "tick": summary(built.tick),
            "tick_cpu": summary(built.tick_cpu),
            "report": summary(built.report),
            "report_cpu": summary(built.report_cpu),
            "claimed": built.claimed,
            # a not-live model claims what its ramps and leaky buckets let through
            "expected_claims": 2 * args.ticks * args.claim_size
            if args.model_state == "live"
            else None,  # fmt: skip
        }
    big, little = cycles[str(top)], cycles[str(small)]
    del gates
    gc.collect()

    result: dict[str, Any] = {
        "benchmark": "gate_memory",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": {
            "pending": args.pending,
            "batches": args.batches,
            "owners": args.owners,
            "flex": args.flex,
            "model_state": args.model_state,
            "limit": args.limit,
            "lines_per_chunk": LINES_PER_CHUNK,
            "ticks": args.ticks,
            "claim_size": args.claim_size,
            "run": args.run,
            "report_items": args.report_items,
            "retry_rate": args.retry_rate,
            "fail_rate": args.fail_rate,
            "slow_rate": args.slow_rate,
            "seed": args.seed,
            "python": sys.version.split()[0],
        },
        "memory": {str(n): m for n, m in memory.items()},
        "claim_cycle": {
            "large": top,
            "small": small,
            "per_pending": cycles,
            **{
                f"{kind}_p50_ratio": round(
                    big[kind]["p50_ms"] / max(little[kind]["p50_ms"], 1e-9), 2
                )
                for kind in ("tick", "tick_cpu", "report", "report_cpu")
            },
        },
    }
    if args.run:
        result["run"] = full_run(args)
    return result


def _kib(n: float) -> str:
    return f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def _prefixes(state: dict[str, Any]) -> str:
    parts = [f"{p[0]} {s['records']}" for p, s in state["by_prefix"].items() if s["records"]]
    return f"{state['records']} records ({', '.join(parts) or 'none'}), {_kib(state['bytes'])}"


def report_text(result: dict[str, Any]) -> str:
    p = result["params"]
    rows: list[tuple[str, str]] = [
        ("layout", f"{p['batches']} batches of {p['owners']} owners, model "
                   f"{p.get('model_state', 'live')}, limit "
                   f"{p['limit']}, {p['lines_per_chunk']} lines per chunk; "
                   f"{p.get('flex', 0):,} flex rows pending in the claim cycles"),
    ]  # fmt: skip
    for n, m in result["memory"].items():
        st = m["state"]
        rows += [
            (f"{int(n):,} pending: state", _prefixes(st) + f" = {st['bytes'] / int(n):.3f} B/request"),
            ("  gate held (tracemalloc)",
             f"{_kib(m['traced_bytes'])} = {m['traced_bytes_per_pending']:.3f} B/request"),
            ("  peak while populating", f"{_kib(m['traced_peak_bytes'])} (tracemalloc)"),
        ]  # fmt: skip
    c = result["claim_cycle"]
    for n in (c["large"], c["small"]):
        f = c["per_pending"][str(n)]
        t, r, tc, rc = f["tick"], f["report"], f["tick_cpu"], f["report_cpu"]
        rows += [
            (f"claim cycle at {n:,} pending",
             f"tick p50 {t['p50_ms']:.3f} / p99 {t['p99_ms']:.3f} ms (CPU {tc['p50_ms']:.3f} / "
             f"{tc['p99_ms']:.3f}); report p50 {r['p50_ms']:.3f} / p99 {r['p99_ms']:.3f} ms "
             f"(CPU {rc['p50_ms']:.3f} / {rc['p99_ms']:.3f}); "
             f"{f['claimed']}/{f['expected_claims'] or '-'} claimed"),
            ("  populating it",
             f"{f['ingest_rows_per_s']:,} rows/s; largest record " + ", ".join(
                 f"{k} {_kib(v)}" for k, v in sorted(f["largest_record_bytes"].items()))),
        ]  # fmt: skip
    rows.append((
        f"cycle p50 ratio ({c['large']:,} / {c['small']:,})",
        f"tick {c['tick_p50_ratio']:.2f} (CPU {c['tick_cpu_p50_ratio']:.2f}), "
        f"report {c['report_p50_ratio']:.2f} (CPU {c['report_cpu_p50_ratio']:.2f})",
    ))  # fmt: skip
    run = result.get("run")
    if run:
        pk, after = run["peak"], run["after"]
        h = run["handle"]
        rows += [
            ("run", f"{run['requests']:,} requests, {run['reports']:,} reports "
                    f"({run['report_items_mean']} items avg), {run['ticks']} ticks, "
                    f"{run['simulated_s']} s simulated, {run['wall_s']} s wall"),
            ("  each request ended once",
             f"{'yes' if run['ended_once'] else 'NO'} ({run['ended']:,} ended, "
             f"{run['ended_twice']} twice; {run['claims']:,} claims)"),
            ("  state at its largest",
             f"{_prefixes(pk['state'])} at {pk['at_s']} s ({pk['requests_ended_by_then']:,} "
             f"ended by then; in flight {pk['indexes']['in_flight']}, delayed "
             f"{pk['indexes']['delayed']})"),
            ("  state after the run", _prefixes(after["state"])),
            ("  rebuild() at largest / after",
             f"{pk['rebuild']['p50_ms']:.3f} ms / {after['rebuild']['p50_ms']:.3f} ms (p50)"),
            ("  indexes after the run",
             ", ".join(f"{k} {v}" for k, v in after["indexes"].items())),
            ("  records per request",
             ", ".join(f"{k} {v}" for k, v in run["records_per_request"].items())),
            ("  gate CPU per request", f"{run['gate_cpu_us_per_request']} us (CPU in handle)"),
            ("  handle(ExecutionReport)",
             f"p50 {h['ExecutionReport']['p50_ms']:.3f} / p99 "
             f"{h['ExecutionReport']['p99_ms']:.3f} ms"),
            ("  largest record",
             ", ".join(f"{k} {_kib(v)}" for k, v in sorted(run["largest_record_bytes"].items()))),
        ]  # fmt: skip
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)


def _counts(text: str) -> list[int]:
    values = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of counts >= 1")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gate_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--pending", type=_counts, default=[100_000, 1_000_000],
                   help="pending rows, comma-separated (100000,1000000)")  # fmt: skip
    p.add_argument("--batches", type=int, default=100, help="batches the rows spread over (100)")
    p.add_argument("--owners", type=int, default=20, help="owners of the batches (20)")
    p.add_argument("--flex", type=int, default=0,
                   help="batchless flex rows pending beside the batches in the claim cycles (0)")  # fmt: skip
    p.add_argument("--model-state", choices=["live", "coming"], default="live",
                   help="the model's state in the claim cycles: coming = not live (live)")  # fmt: skip
    p.add_argument("--limit", type=int, default=64, help="the model's concurrency limit (64)")
    p.add_argument("--ticks", type=int, default=200, help="claim cycles timed per N (200)")
    p.add_argument("--claim-size", type=int, default=16,
                   help="slots freed before each timed cycle (16)")  # fmt: skip
    p.add_argument("--run", type=int, default=200_000,
                   help="requests of the full run; 0 skips it (200000)")  # fmt: skip
    p.add_argument("--report-items", type=int, default=16,
                   help="finished calls per executor report: 1..this, uniform (16)")  # fmt: skip
    p.add_argument("--retry-rate", type=float, default=0.01, help="calls retried (0.01)")
    p.add_argument("--fail-rate", type=float, default=0.005, help="calls failed (0.005)")
    p.add_argument("--slow-rate", type=float, default=0.1,
                   help="calls reported started before they end (0.1)")  # fmt: skip
    p.add_argument("--rebuilds", type=int, default=20, help="rebuild() timings, p50 (20)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the run (1)")
    args = p.parse_args(argv)
    if min(args.batches, args.owners, args.limit, args.ticks, args.claim_size) < 1:
        p.error("--batches, --owners, --limit, --ticks and --claim-size must be >= 1")
    if min(args.pending) < args.batches:
        p.error("every --pending must be >= --batches")
    if args.run and args.run < args.batches:
        p.error("--run must be 0 or >= --batches")
    if args.claim_size > args.limit or args.report_items < 1 or args.rebuilds < 1:
        p.error("--claim-size must be <= --limit, --report-items and --rebuilds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    result = run(parse_args(argv))
    title = "Cannonade claim gate: memory and recovery for live work only"
    save_and_report("gate_memory", title, result, report_text(result))
    return 0 if result.get("run", {}).get("ended_once", True) else 1


if __name__ == "__main__":
    sys.exit(main())
