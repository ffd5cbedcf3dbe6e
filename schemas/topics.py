"""The topic catalog: every Kafka topic Cannonade uses, its key and what flows on it.

The local stack and the deployment create topics from this catalog with explicit partition
counts; nothing relies on broker auto-creation.
"""

from __future__ import annotations

import msgspec

# Topics the claim gate reads are keyed by model and must share one partition count, so that
# everything the gate knows about a model lives on one worker (co-partitioning).
GATE_PARTITIONS = 4


class Topic(msgspec.Struct, frozen=True):
    name: str
    key: str
    partitions: int
    carries: str
    compacted: bool = False
    # Large enough for a 10 MiB request body plus framing; the broker limit matches.
    max_message_bytes: int = 16 * 1024 * 1024


COMMANDS = Topic(
    "cannonade.commands.v1",
    key="aggregate id (file_id or batch_id)",
    partitions=4,
    carries="commands from the HTTP API or upstream services: CreateFile, AppendFileLines, "
    "DeleteFile, CreateBatch, CancelBatch",
)
FILES = Topic(
    "cannonade.files.v1",
    key="file_id",
    partitions=4,
    carries="TemplatesAppended, FileUploaded, FileDeleted (ids, lines, sizes; no bodies)",
)
BATCHES = Topic(
    "cannonade.batches.v1",
    key="batch_id",
    partitions=4,
    carries="BatchCreated, BatchPopulated, BatchPopulationFailed, BatchCancelRequested",
)
REQUESTS = Topic(
    "cannonade.requests.v1",
    key="model",
    partitions=GATE_PARTITIONS,
    carries="request lifecycle: RequestsPending, RequestClaimed, RequestStarted, "
    "RequestCompleted, RequestFailed, RequestCanceled (ids, states, codes, sizes, times)",
)
GATE = Topic(
    "cannonade.gate.v1",
    key="model",
    partitions=GATE_PARTITIONS,
    carries="inputs to the claim gate besides the lifecycle: executor reports "
    "(ExecutionStarted, ExecutionFinished) and batch control (CancelBatchRequests)",
)
DISPATCH = Topic(
    "cannonade.dispatch.v1",
    key="request_id",
    partitions=4,
    carries="Dispatch work items from the gate to executors (claim_id, attempt; no bodies, "
    "no credentials)",
)
BODIES = Topic(
    "cannonade.bodies.v1",
    key="'tpl:<template_id>' | 'res:<request_id>' | 'err:<request_id>'",
    partitions=4,
    compacted=True,
    carries="request bodies, response bodies and error envelopes; erasure writes tombstones",
)
MODEL_FILTERS = Topic(
    "cannonade.model-filters.v1",
    key="model",
    partitions=GATE_PARTITIONS,
    compacted=True,
    carries="ModelFilterAppended: a model's liveness (live, coming, absent, leaving); compaction "
    "keeps the latest event per model forever",
)
WORKERS = Topic(
    "cannonade.workers.v1",
    key="worker_id",
    partitions=4,
    carries="WorkerStarted, WorkerHeartbeat, WorkerStopped (projected as daemons)",
)
DEADLETTER = Topic(
    "cannonade.deadletter.v1",
    key="the rejected message's key",
    partitions=1,
    carries="DeadLetter: a message that failed validation, where it came from and why",
)


def changelog(app_id: str, table: str, partitions: int) -> Topic:
    """A Faust table's changelog. Created with the catalog rather than by the worker, so a
    worker never meets its table before the broker's metadata knows the topic."""
    return Topic(
        f"{app_id}-{table}-changelog",
        key="the table key",
        partitions=partitions,
        compacted=True,
        carries=f"changelog of the {app_id} worker's '{table}' table",
    )


# Table names are referenced by the agents that own them (streams/agents/*).
CHANGELOGS: tuple[Topic, ...] = (
    changelog("cannonade-commands", "batch-progress", COMMANDS.partitions),
    changelog("cannonade-gate", "gate-entries", GATE_PARTITIONS),
    changelog("cannonade-gate", "gate-cancelled-batches", GATE_PARTITIONS),
    changelog("cannonade-gate", "gate-buckets", GATE_PARTITIONS),
    changelog("cannonade-gate", "gate-model-states", GATE_PARTITIONS),
)

ALL: tuple[Topic, ...] = (
    COMMANDS, FILES, BATCHES, REQUESTS, GATE, DISPATCH, BODIES, MODEL_FILTERS, WORKERS,
    DEADLETTER, *CHANGELOGS,
)  # fmt: skip
