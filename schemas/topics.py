"""The topic catalog: every Kafka topic Cannonade uses, its key and what flows on it.

The local stack and the deployment create topics from this catalog with explicit partition
counts; nothing relies on broker auto-creation.
"""

from __future__ import annotations

import msgspec

# Topics the claim gate reads are keyed by model and must share one partition count, so that
# everything the gate knows about a model lives on one worker (co-partitioning).
GATE_PARTITIONS = 4


# Large enough for a 10 MiB request body plus framing; the broker limit matches, and every
# process checks at start-up that the configured body limit fits (cannonade.limits).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class Topic(msgspec.Struct, frozen=True):
    name: str
    key: str
    partitions: int
    carries: str
    compacted: bool = False
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # Extra topic configuration (compaction pace of changelogs, retention of the record).
    config: dict[str, str] = {}


# The system of record: a replay into an empty database rebuilds every read model from these,
# so nothing on them may expire (the broker's default deletes segments after seven days).
_KEPT = {"retention.ms": "-1", "retention.bytes": "-1"}


COMMANDS = Topic(
    "cannonade.commands.v1",
    key="aggregate id (file_id or batch_id)",
    partitions=4,
    carries="commands from the HTTP API or upstream services (AppendFileLines, CreateFile, "
    "AbandonUpload, DeleteFile, CreateBatch keyed by file_id; CancelBatch keyed by batch_id) and the agent's "
    "own PopulateBatch; no user content",
)
FILES = Topic(
    "cannonade.files.v1",
    key="file_id",
    partitions=4,
    carries="TemplatesAppended, FileUploaded, UploadAbandoned, FileDeleted (ids, custom_ids, models, sizes, "
    "body refs; no bodies)",
    config=_KEPT,
)
BATCHES = Topic(
    "cannonade.batches.v1",
    key="batch_id",
    partitions=4,
    carries="BatchCreated, BatchRejected, BatchPopulated, BatchPopulationFailed, "
    "BatchCancelRequested, BatchRetried, BatchDeleted, BatchNotified",
    config=_KEPT,
)
REQUESTS = Topic(
    "cannonade.requests.v1",
    key="model",
    partitions=GATE_PARTITIONS,
    carries="the request lifecycle, written by the claim gate: RequestTransitions records, "
    "each a list of RequestsPending, RequestClaimed, RequestStarted, RequestCompleted, "
    "RequestFailed, RequestRetryScheduled, RequestCanceled, RequestReclaimed events (ids, "
    "states, codes, sizes, times)",
    config=_KEPT,
)
GATE = Topic(
    "cannonade.gate.v1",
    key="model",
    partitions=GATE_PARTITIONS,
    carries="inputs to the claim gate: population (PendingRequests), executor reports "
    "(ExecutionReport), batch control (CancelBatchRequests), ticks and executor heartbeats",
)
DISPATCH = Topic(
    "cannonade.dispatch.v1",
    key="request_id (the gate picks the partition: one per run of 16 consecutive lines of a batch, per request otherwise; stable, so a re-made claim meets the executor that ran it)",
    partitions=4,
    carries="DispatchBatch work items from the gate to executors (claim ids, attempts, body "
    "refs; no bodies, no credentials) and AbortDispatch",
)
BODIES = Topic(
    "cannonade.bodies.v1",
    key="'tplc:<file>:<upload>:<line>' | 'tpl:<request>' | 'res:<request>' | 'err:<request>'",
    partitions=4,
    compacted=True,
    carries="user content: chunks of uploaded lines, request bodies, response bodies and "
    "error envelopes (schemas.bodies); erasure writes tombstones",
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
RESPONSES = Topic(
    "cannonade.responses.v1",
    key="response uuid (= the head request id)",
    partitions=4,
    carries="multi-step chains: ChainStarted, StepRecorded, StepStarted, StepCompleted, "
    "StepFailed, ResponseFinalized (ids, kinds, states, times, body refs; payloads are on the "
    "bodies topic)",
    config=_KEPT,
)
STEP_WORK = Topic(
    "cannonade.step-work.v1",
    key="response uuid",
    partitions=4,
    carries="StepWork: a chain step (model call or server-side tool call) for the step "
    "executors (body refs only)",
)
KEYS = Topic(
    "cannonade.keys.v1",
    key="key_id",
    partitions=1,
    compacted=True,
    carries="ApiKey: each API key's owner, sha256 hash and revocation (never the secret), so "
    "a rebuild of the read models restores every key",
)
DEADLETTER = Topic(
    "cannonade.deadletter.v1",
    key="the rejected message's key",
    partitions=1,
    carries="DeadLetter: a message that failed validation, where it came from and why",
)


# Changelogs hold live state only: short segments and an eager cleaner keep a table's
# recovery proportional to what is live, not to everything that ever passed through it.
_CHANGELOG_CONFIG = {
    "segment.ms": "60000",
    "min.cleanable.dirty.ratio": "0.1",
    "delete.retention.ms": "60000",
}


def changelog(app_id: str, table: str, partitions: int) -> Topic:
    """A Faust table's changelog. Created with the catalog rather than by the worker, so a
    worker never meets its table before the broker's metadata knows the topic."""
    return Topic(
        f"{app_id}-{table}-changelog",
        key="the table key",
        partitions=partitions,
        compacted=True,
        carries=f"changelog of the {app_id} worker's '{table}' table",
        config=_CHANGELOG_CONFIG,
    )


# Table names are referenced by the agents that own them (streams/agents/*).
COMMANDS_FILES_TABLE = "files"
COMMANDS_BATCHES_TABLE = "batches"
GATE_TABLE = "state"
COMMANDS_REQUESTS_TABLE = "requests"
CHAINS_TABLE = "chains"
CHANGELOGS: tuple[Topic, ...] = (
    changelog("cannonade-commands", COMMANDS_FILES_TABLE, COMMANDS.partitions),
    changelog("cannonade-commands", COMMANDS_BATCHES_TABLE, COMMANDS.partitions),
    changelog("cannonade-commands", COMMANDS_REQUESTS_TABLE, COMMANDS.partitions),
    changelog("cannonade-chains", CHAINS_TABLE, RESPONSES.partitions),
    changelog("cannonade-gate", GATE_TABLE, GATE_PARTITIONS),
)


def leader(app_id: str) -> Topic:
    """The topic Faust's leader assignor gives to one member of a worker group; that member
    runs the group's ``on_leader`` timers (the gate's ticks, which drive retries, reclaims and
    expiry). Created with the catalog: a group that forms before a worker has created it gets
    no leader until its next rebalance, and then no tick is sent."""
    return Topic(
        f"{app_id}-__assignor-__leader",
        key="none",
        partitions=1,
        carries="nothing: its one partition marks the group's leader",
    )


LEADERS: tuple[Topic, ...] = tuple(
    leader(f"cannonade-{role}") for role in ("commands", "gate", "executor", "chains")
)

# Webhooks (batch notifications, core §4.9): registrations and delivery attempts, so a read
# model rebuilt from the log knows every endpoint and never notifies twice.
WEBHOOKS = Topic(
    "cannonade.webhooks.v1",
    key="webhook_id",
    partitions=1,
    compacted=True,
    carries="WebhookEndpoint: each webhook endpoint's owner, URL, event types and signing "
    "secret sealed with a configured key (never in clear); a deleted endpoint's record has no "
    "secret",
)
WEBHOOK_DELIVERIES = Topic(
    "cannonade.webhook-deliveries.v1",
    key="delivery_id",
    partitions=4,
    carries="WebhookAttempted: each attempt to deliver a batch notification to an endpoint "
    "(HTTP status or error, outcome, next attempt); the notifications themselves are "
    "BatchNotified on the batches topic",
    config=_KEPT,
)

ALL: tuple[Topic, ...] = (
    COMMANDS, FILES, BATCHES, REQUESTS, GATE, DISPATCH, BODIES, MODEL_FILTERS, WORKERS, KEYS,
    RESPONSES, STEP_WORK, DEADLETTER, *CHANGELOGS, WEBHOOKS, WEBHOOK_DELIVERIES, *LEADERS,
)  # fmt: skip
