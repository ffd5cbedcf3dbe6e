"""What a batch that never ended was waiting for, for a failure message: the CI keeps only the
output, and the stack's data goes with the run.

:func:`stuck` tells the cases apart (rows by state, who owns the model's gate partition, the
fake upstream's calls in flight, each worker's latest errors) and follows a few unended rows
through every record that names them: the read model's row, their lifecycle events, their
dispatches and aborts, the executors' reports on the gate topic, and the gate table's records
of them and of their batch (its changelog)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
from aiokafka.partitioner import DefaultPartitioner

from compose import stack
from compose.services import Services
from schemas import topics
from streams.gate.core import GateBatch, GateRequest
from tests.integration.conftest import log_path, read_topic, upstream_stats

FOLLOWED = 4  # unended rows followed through the log


def model_partition(model: str) -> int:
    """The gate/lifecycle partition of ``model`` (records are keyed by model)."""
    every = list(range(topics.GATE_PARTITIONS))
    return int(DefaultPartitioner()(model.encode(), every, every))


_ASSIGNED = "Executing _on_partitions_assigned"
_ACTIVE_TABLE = "Highwater for active changelog partitions"
_ROW = re.compile(r"^\|[^|]+\|\s*(\d+)\s*\|", re.MULTILINE)


def active_partitions(services: Services, name: str) -> set[int]:
    """The gate table partitions ``name`` owns since its latest assignment, from its log
    (Faust logs the active changelog partitions it recovers, as a table, on every
    assignment; each log line is a JSON object)."""
    messages = [
        str(json.loads(line).get("message", ""))
        for line in log_path(services, name).read_text(errors="replace").splitlines()
        if line.startswith("{")
    ]
    assigned = max((i for i, m in enumerate(messages) if _ASSIGNED in m), default=0)
    table = next((m for m in messages[assigned:] if _ACTIVE_TABLE in m), "")
    return {int(p) for p in _ROW.findall(table)}


def stuck(services: Services, info: stack.StackInfo, batch_id: str, model: str) -> str:
    lines = [f"at {datetime.now(UTC).isoformat()}"]
    try:
        rows = asyncio.run(_unended(info.database_url, batch_id))
    except (OSError, asyncpg.PostgresError) as exc:
        rows = []
        lines.append(f"rows: {exc!r}")
    for state, group in _by_state(rows).items():
        claims = [r["claimed_at"] for r in group if r["claimed_at"] is not None]
        lines.append(
            f"rows {state}: {len(group)}, claimed {min(claims, default=None)} .. "
            f"{max(claims, default=None)}, daemons {sorted({str(r['daemon_id']) for r in group})}"
        )
    workers = sorted(n for n in services.procs if n.startswith(("gate-", "executor-")))
    gates = [name for name in workers if name.startswith("gate-")]
    owners = {gate: sorted(active_partitions(services, gate)) for gate in gates}
    lines.append(f"gate partition {model_partition(model)}; owned: {owners}")
    try:
        figures = upstream_stats(services)["models"].get(model) or {}
        lines.append(f"upstream { ({k: figures.get(k) for k in ('calls', 'in_flight')}) }")
    except OSError as exc:
        lines.append(f"upstream: {exc!r}")
    for name in workers:
        logged = log_path(services, name).read_text(errors="replace").splitlines()
        errors = [line[:300] for line in logged if '"level": "error"' in line]
        lines += [f"{name}: {len(logged)} log lines, last {logged[-1][:120] if logged else None}"]
        lines += [f"  {line}" for line in errors[-3:]]
    followed = {str(r["id"]): r for r in rows[:FOLLOWED]}
    try:
        lines += asyncio.run(_histories(info.kafka_bootstrap, batch_id, followed))
    except (OSError, TimeoutError) as exc:
        lines.append(f"histories: {exc!r}")
    return "\n".join(lines)


async def _unended(dsn: str, batch_id: str) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(
            "SELECT id, state, claim_id, daemon_id, claimed_at, started_at, retry_attempt,"
            " not_before, last_offset FROM requests WHERE batch_id = $1"
            " AND state NOT IN ('completed', 'failed', 'canceled') ORDER BY line_number",
            uuid.UUID(batch_id),
        ))  # fmt: skip
    finally:
        await conn.close()


def _by_state(rows: list[Any]) -> dict[str, list[Any]]:
    grouped: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        grouped[row["state"]].append(row)
    return grouped


async def _histories(bootstrap: str, batch_id: str, rows: dict[str, Any]) -> list[str]:
    """Every record naming one of ``rows``, topic by topic, as (partition, offset, what)."""
    seen: dict[str, list[str]] = defaultdict(list)
    for record in await read_topic(bootstrap, topics.REQUESTS):
        for event in _decoded(record.value).get("events", []):
            if event.get("request_id") in rows:
                seen[event["request_id"]].append(
                    f"requests {record.partition}@{record.offset} {event['type']}"
                    f" from {event.get('from_state')} claim {event.get('claim_id')}"
                    f" by {event.get('worker_id')} at {event.get('occurred_at')}"
                )  # fmt: skip
    for record in await read_topic(bootstrap, topics.DISPATCH):
        message = _decoded(record.value)
        for item in message.get("items", []):
            if item.get("request_id") in rows:
                seen[item["request_id"]].append(
                    f"dispatch {record.partition}@{record.offset} claim {item['claim_id']}"
                    f" lane {item.get('lane')} claimed at {item.get('claimed_at')}"
                )  # fmt: skip
        if message.get("request_id") in rows:  # an abort
            seen[message["request_id"]].append(
                f"dispatch {record.partition}@{record.offset} {message.get('type')}"
                f" claim {message.get('claim_id')}"
            )  # fmt: skip
    for record in await read_topic(bootstrap, topics.GATE):
        message = _decoded(record.value)
        for kind in ("started", "finished"):
            for item in message.get(kind) or []:
                request_id = item[0] if isinstance(item, list) else item.get("request_id")
                if request_id in rows:
                    seen[request_id].append(
                        f"gate {record.partition}@{record.offset} {kind} {item}"
                        f" from {message.get('worker_id')} at {message.get('occurred_at')}"
                    )  # fmt: skip
    table = next(t for t in topics.CHANGELOGS if t.name.startswith("cannonade-gate-"))
    batch_records: list[str] = []
    for record in await read_topic(bootstrap, table):
        key = record.key.decode(errors="replace")
        at = f"changelog {record.partition}@{record.offset}"
        if key.startswith("R:") and key[2:] in rows:
            value = None if record.value is None else msgspec.msgpack.decode(record.value, type=GateRequest)  # fmt: skip
            seen[key[2:]].append(f"{at} {_brief(value)}")
        elif key.startswith(f"B:{batch_id}:"):
            value_ = None if record.value is None else msgspec.msgpack.decode(record.value, type=GateBatch)  # fmt: skip
            batch_records.append(f"{at} {None if value_ is None else (value_.unclaimed, value_.closed)}")  # fmt: skip
    lines = [f"gate batch record (unclaimed, closed): {batch_records[-5:]}"]
    for request_id, row in rows.items():
        lines.append(
            f"row {request_id}: {row['state']} claim {row['claim_id']} by {row['daemon_id']}"
            f" offset {row['last_offset']}"
        )  # fmt: skip
        lines += [f"  {entry}" for entry in seen[request_id]]
    return lines


def _decoded(value: bytes | None) -> dict[str, Any]:
    try:
        decoded = msgspec.json.decode(value or b"")
    except msgspec.DecodeError:
        return {}
    return decoded if isinstance(decoded, dict) else {}


def _brief(entry: GateRequest | None) -> str:
    if entry is None:
        return "deleted"
    return (
        f"{entry.state} claim {entry.claim_id} (claims {entry.claims}, attempt {entry.attempt})"
        f" worker {entry.worker_id} lane {entry.lane} abort {entry.abort}"
    )
