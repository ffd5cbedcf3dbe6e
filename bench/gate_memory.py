"""Claim gate memory per pending request, and the cost of one claim cycle over a backlog.

    python -m bench.gate_memory [--pending 100000] [--ticks 200]

In process, no broker: builds a :class:`streams.gate.core.Gate` on plain dicts with limits
``{"m": 64}`` and model ``m`` marked ``coming`` (so only the leaky bucket's one row per owner is
claimed: the backlog stays pending), then feeds it ``RequestsPending`` chunks of up to 1000
rows — 20 owners x 5 batches, N/100 rows each, ids derived as population derives them — and
prints:

- gate memory for N pending rows: RSS delta (VmRSS, no tracing) and tracemalloc current after
  minus before (a second, traced build), in bytes per pending request and MiB;
- ingest rate (rows/s through ``gate.handle(RequestsPending)``);
- ``gate.handle(GateTick)`` — one claim cycle (release due retries, reclaim check, candidate
  gathering, ranking) over the whole backlog — p50/p99/max over ``--ticks`` ticks, at N and at
  N/10 pending rows (ticked alternately, so load from other processes hits both alike); a
  cycle cost that grows with the backlog shows up as a p50 ratio above 1.

Figures also go to ``bench/results/gate_memory-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.baseline import save_and_report
from schemas import ids
from schemas.events import GateTick, PendingItem, RequestsPending
from streams.gate.core import Gate

MODEL = "m"
LIMIT = 64
OWNERS = 20
BATCHES_PER_OWNER = 5
CHUNK = 1000  # streams.population.PENDING_CHUNK
WINDOW_S = 86400.0
T0 = datetime(2026, 1, 1, tzinfo=UTC)  # synthetic clock: runs are reproducible
TICK_STEP = timedelta(milliseconds=10)  # 200 ticks = 2 s: no claim reaches its 60 s timeout


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def new_gate() -> Gate:
    return Gate({}, {MODEL: LIMIT}, "bench-gate", {}, model_states={MODEL: b"coming"}, buckets={})


def chunks(pending: int) -> Iterator[RequestsPending]:
    """N pending rows as population publishes them: per batch, chunks of up to 1000 rows.

    Built lazily, so the ids the gate keeps are allocated (and counted) while it is measured,
    and each message is garbage once handled."""
    batches = OWNERS * BATCHES_PER_OWNER
    per_batch, extra = divmod(pending, batches)
    deadline = T0 + timedelta(seconds=WINDOW_S)
    rid, tid = ids.request_id, ids.template_id
    for b in range(batches):
        owner = f"user-{b % OWNERS:02d}"
        batch_id = ids.derived("bench-batch", b)
        file_id = ids.derived("bench-file", b)
        rows = per_batch + (1 if b < extra else 0)
        for start in range(0, rows, CHUNK):
            lines = range(start, min(start + CHUNK, rows))
            items = [
                PendingItem(rid(batch_id, line), tid(file_id, line), line, f"req-{line}")
                for line in lines
            ]
            yield RequestsPending(
                event_id=ids.event_id("pending", batch_id, MODEL, start), occurred_at=T0,
                batch_id=batch_id, model=MODEL, owner=owner, created_at=T0, deadline=deadline,
                window_class="24h", service_tier=None, items=items, window_s=WINDOW_S,
            )  # fmt: skip


def fill(gate: Gate, pending: int) -> tuple[float, int]:
    """Feed ``pending`` rows; returns (seconds spent in handle, rows claimed meanwhile)."""
    spent, claimed = 0.0, 0
    for message in chunks(pending):
        t = time.perf_counter()
        outs = gate.handle(message, T0)
        spent += time.perf_counter() - t
        claimed += sum(1 for o in outs if o.topic == "dispatch")
    return spent, claimed


def tick_once(gate: Gate, i: int) -> tuple[float, int]:
    """One ``GateTick`` through ``gate.handle``: (milliseconds, rows claimed)."""
    now = T0 + (i + 1) * TICK_STEP
    tick = GateTick(event_id=ids.new_id(), occurred_at=now, model=MODEL)
    t = time.perf_counter()
    outs = gate.handle(tick, now)
    return (time.perf_counter() - t) * 1000, sum(1 for o in outs if o.topic == "dispatch")


def summary(samples: list[float], claimed: int) -> dict[str, Any]:
    samples = sorted(samples)
    return {
        "ticks": len(samples),
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(samples[min(len(samples) - 1, int(0.99 * len(samples)))], 3),
        "max_ms": round(samples[-1], 3),
        "claimed_during_ticks": claimed,
    }


def time_ticks(big: Gate, small: Gate, ticks: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tick both gates alternately, so load from other processes hits both alike."""
    samples: tuple[list[float], list[float]] = ([], [])
    claimed = [0, 0]
    for i in range(ticks):
        for k, gate in enumerate((big, small)):
            ms, n = tick_once(gate, i)
            samples[k].append(ms)
            claimed[k] += n
    return summary(samples[0], claimed[0]), summary(samples[1], claimed[1])


def state_counts(gate: Gate) -> dict[str, int]:
    index = gate.models[MODEL]
    return {
        "entries": len(gate.entries),
        "pending_heap_items": sum(len(h) for h in index.pending.values()),
        "in_flight": len(index.in_flight),
        "batches": len(index.pending),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.pending
    gc.collect()

    # 1. RSS, untraced; this gate is then timed.
    rss_before = rss_kib()
    gate = new_gate()
    ingest_s, claimed = fill(gate, n)
    gc.collect()
    rss_delta = (rss_kib() - rss_before) * 1024
    counts = state_counts(gate)
    entry_bytes = sum(len(raw) for raw in gate.entries.values())

    # 2. The same cycle over a tenth of the backlog, ticked alternately with the full one.
    small = max(n // 10, OWNERS * BATCHES_PER_OWNER)
    small_gate = new_gate()
    fill(small_gate, small)
    gc.collect()
    ticks_n, ticks_small = time_ticks(gate, small_gate, args.ticks)
    del gate, small_gate
    gc.collect()

    # 3. The same build traced: bytes the gate still holds once built.
    tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0]
    gate = new_gate()
    fill(gate, n)
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - traced_before
    top = tracemalloc.take_snapshot().statistics("filename")[:5]
    tracemalloc.stop()
    del gate
    gc.collect()

    return {
        "benchmark": "gate_memory",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": {
            "pending": n,
            "owners": OWNERS,
            "batches": OWNERS * BATCHES_PER_OWNER,
            "chunk": CHUNK,
            "limit": LIMIT,
            "model_state": "coming",
            "python": sys.version.split()[0],
        },
        "figures": {
            "traced_bytes": traced,
            "traced_bytes_per_pending": round(traced / n, 1),
            "traced_mib": round(traced / 2**20, 1),
            "rss_delta_bytes": rss_delta,
            "rss_bytes_per_pending": round(rss_delta / n, 1),
            "rss_delta_mib": round(rss_delta / 2**20, 1),
            "encoded_entry_bytes_avg": round(entry_bytes / max(counts["entries"], 1), 1),
            "ingest_rows_per_s": round(n / ingest_s),
            "claimed_while_filling": claimed,
            "tick": ticks_n,
            "tick_small": {"pending": small, **ticks_small},
            "tick_p50_ratio": round(ticks_n["p50_ms"] / max(ticks_small["p50_ms"], 1e-9), 2),
        },
        "state": counts,
        "traced_top_files": [
            {"file": str(s.traceback[0].filename), "mib": round(s.size / 2**20, 2)} for s in top
        ],
    }


def report(result: dict[str, Any]) -> str:
    f, p = result["figures"], result["params"]
    t, s = f["tick"], f["tick_small"]
    rows = [
        ("pending requests", f"{p['pending']} ({p['owners']} owners x "
                             f"{p['batches'] // p['owners']} batches, model {p['model_state']})"),
        ("gate memory (tracemalloc)",
         f"{f['traced_bytes_per_pending']:.0f} B/request, {f['traced_mib']:.1f} MiB total"),
        ("gate memory (RSS delta)",
         f"{f['rss_bytes_per_pending']:.0f} B/request, {f['rss_delta_mib']:.1f} MiB total"),
        ("  of which encoded entries", f"{f['encoded_entry_bytes_avg']:.0f} B/request (msgpack)"),
        ("ingest (handle RequestsPending)", f"{f['ingest_rows_per_s']} rows/s"),
        (f"claim cycle at {p['pending']} pending",
         f"p50 {t['p50_ms']:.2f} ms  p99 {t['p99_ms']:.2f} ms  max {t['max_ms']:.2f} ms"),
        (f"claim cycle at {s['pending']} pending",
         f"p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms  max {s['max_ms']:.2f} ms"),
        ("cycle p50 ratio (N / N/10)", f"{f['tick_p50_ratio']:.2f}"),
    ]  # fmt: skip
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gate_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--pending", type=int, default=100_000, help="pending rows (100000)")
    p.add_argument("--ticks", type=int, default=200, help="claim cycles timed (200)")
    args = p.parse_args(argv)
    if args.pending < OWNERS * BATCHES_PER_OWNER or args.ticks < 1:
        p.error(f"--pending must be >= {OWNERS * BATCHES_PER_OWNER} and --ticks >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    result = run(parse_args(argv))
    title = "Cannonade claim gate: memory per pending request, claim cycle cost"
    save_and_report("gate_memory", title, result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
