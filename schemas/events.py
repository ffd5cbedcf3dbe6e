"""Events: the facts Cannonade records on Kafka.

Every event is a msgspec Struct tagged by its class name in the ``type`` field and carries
``event_id``, ``occurred_at`` and ``schema_version``. Lifecycle events carry ids, states,
status codes, sizes and times only: prompt and completion text travels on the bodies topic
(:class:`Body`), so analytics consumers of the lifecycle never see user content.

Event ids of decisions are deterministic (see :func:`schemas.ids.event_id`), so a redelivered
decision is recognisable as the same event rather than a second one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

SCHEMA_VERSION = 1


class Event(msgspec.Struct, kw_only=True, frozen=True, tag_field="type"):
    event_id: str
    occurred_at: datetime
    schema_version: int = SCHEMA_VERSION


# --- files.v1 (key: file_id) -------------------------------------------------------------


class TemplateMeta(msgspec.Struct, frozen=True):
    """One uploaded line, without its body (the body is on the bodies topic)."""

    template_id: str
    line_number: int  # 0-based, upload order
    custom_id: str | None
    method: str
    path: str
    model: str
    body_size: int


class TemplatesAppended(Event, tag=True, frozen=True):
    file_id: str
    templates: list[TemplateMeta]


class FileUploaded(Event, tag=True, frozen=True):
    """Published after every TemplatesAppended of the file, on the same partition."""

    file_id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    created_at: datetime
    expires_at: datetime | None
    template_count: int
    api_key_id: str | None = None


class FileDeleted(Event, tag=True, frozen=True):
    file_id: str


FileEvent = TemplatesAppended | FileUploaded | FileDeleted


# --- batches.v1 (key: batch_id) ----------------------------------------------------------


class BatchCreated(Event, tag=True, frozen=True):
    batch_id: str
    owner: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    created_at: datetime
    expires_at: datetime
    output_file_id: str
    error_file_id: str
    api_key_id: str | None = None


class BatchPopulated(Event, tag=True, frozen=True):
    batch_id: str
    total: int
    models: dict[str, int]  # requests per model: where the gate must be told of a cancel


class BatchPopulationFailed(Event, tag=True, frozen=True):
    batch_id: str
    message: str


class BatchCancelRequested(Event, tag=True, frozen=True):
    batch_id: str


BatchEvent = BatchCreated | BatchPopulated | BatchPopulationFailed | BatchCancelRequested


# --- requests.v1 (key: model) ------------------------------------------------------------


class PendingItem(msgspec.Struct, frozen=True, array_like=True):
    request_id: str
    template_id: str
    line_number: int
    custom_id: str | None


class RequestsPending(Event, tag=True, frozen=True):
    """A chunk of a batch's rows becoming pending (population), all of one model."""

    batch_id: str | None
    model: str
    owner: str
    created_at: datetime
    deadline: datetime
    window_class: str
    service_tier: str | None
    items: list[PendingItem]
    # W of core §3.2: for batch rows expires_at − batch created_at (not the window text).
    window_s: float = 86400.0


class RequestClaimed(Event, tag=True, frozen=True):
    request_id: str
    batch_id: str | None
    model: str
    claim_id: str
    worker_id: str
    attempt: int


class RequestStarted(Event, tag=True, frozen=True):
    request_id: str
    batch_id: str | None
    model: str
    claim_id: str
    worker_id: str


class RequestCompleted(Event, tag=True, frozen=True):
    request_id: str
    batch_id: str | None
    model: str
    claim_id: str | None
    status: int
    size: int
    routed_model: str
    attempt: int


class RequestFailed(Event, tag=True, frozen=True):
    request_id: str
    batch_id: str | None
    model: str
    claim_id: str | None
    error_type: str  # the FailureReason variant; the envelope itself is on the bodies topic
    status: int | None
    size: int
    attempt: int


class RequestRetryScheduled(Event, tag=True, frozen=True):
    request_id: str
    batch_id: str | None
    model: str
    claim_id: str
    attempt: int  # the attempt that will run next
    not_before: datetime


class RequestCanceled(Event, tag=True, frozen=True):
    request_id: str
    batch_id: str | None
    model: str


class RequestReclaimed(Event, tag=True, frozen=True):
    """A stale claim returned to pending (core §4.8); counts as an attempt (README)."""

    request_id: str
    batch_id: str | None
    model: str
    claim_id: str  # the claim taken away
    attempt: int  # the attempt that will run next
    reason: Literal["claim_timeout", "processing_timeout", "worker_dead", "worker_stale"]


RequestEvent = (
    RequestsPending
    | RequestClaimed
    | RequestStarted
    | RequestCompleted
    | RequestFailed
    | RequestRetryScheduled
    | RequestCanceled
    | RequestReclaimed
)
TERMINAL_REQUEST_EVENTS = (RequestCompleted, RequestFailed, RequestCanceled)


# --- gate.v1 (key: model): what the claim gate hears besides the lifecycle -----------------


class ExecutionStarted(Event, tag=True, frozen=True):
    request_id: str
    model: str
    claim_id: str
    worker_id: str


ExecutionResult = Literal["completed", "failed", "retry", "canceled"]


class ExecutionFinished(Event, tag=True, frozen=True):
    request_id: str
    model: str
    claim_id: str
    worker_id: str
    result: ExecutionResult
    status: int | None = None
    size: int = 0
    error_type: str | None = None
    routed_model: str | None = None
    attempt: int = 0
    not_before: datetime | None = None  # with result == "retry"


class CancelBatchRequests(Event, tag=True, frozen=True):
    """Tells the gate partition owning ``model`` to cancel the batch's unsent rows."""

    batch_id: str
    model: str


class GateTick(Event, tag=True, frozen=True):
    """Wakes the gate for time-driven eligibility (retry ``not_before``)."""

    model: str


# --- model-filters.v1 (compacted; key: model) ----------------------------------------------

ModelState = Literal["live", "coming", "absent", "leaving"]


class ModelFilterAppended(Event, tag=True, frozen=True):
    """A model's liveness (core §1.6). Compaction keeps the latest event per model forever."""

    model: str
    state: ModelState
    expected_ready_at: datetime | None = None


# --- workers.v1 (key: worker_id); heartbeats also reach every gate partition ----------------


class WorkerStarted(Event, tag=True, frozen=True):
    worker_id: str
    role: str
    hostname: str
    pid: int
    version: str
    config_snapshot: dict[str, Any] = {}


class WorkerHeartbeat(Event, tag=True, frozen=True):
    worker_id: str
    role: str
    requests_processed: int = 0
    requests_failed: int = 0
    requests_in_flight: int = 0


class WorkerStopped(Event, tag=True, frozen=True):
    worker_id: str
    role: str
    requests_processed: int = 0
    requests_failed: int = 0
    requests_in_flight: int = 0


WorkerEvent = WorkerStarted | WorkerHeartbeat | WorkerStopped

GateInput = (
    ExecutionStarted
    | ExecutionFinished
    | CancelBatchRequests
    | GateTick
    | ModelFilterAppended
    | WorkerHeartbeat
    | WorkerStopped
    | RequestEvent
)


# --- dispatch.v1 (key: request_id) -------------------------------------------------------


class Dispatch(Event, tag=True, frozen=True):
    """A claimed request handed to an executor. No body, no credentials: the executor reads
    the template body from the store and the upstream key from its model configuration."""

    request_id: str
    batch_id: str | None
    template_id: str
    custom_id: str | None
    model: str
    claim_id: str
    attempt: int
    deadline: datetime


class AbortDispatch(Event, tag=True, frozen=True):
    """Abort a running claim (its batch was cancelled); same key as its Dispatch, so it
    reaches the executor that holds it."""

    request_id: str
    claim_id: str


DispatchMessage = Dispatch | AbortDispatch


# --- bodies.v1 (compacted; key: '<kind>:<id>') -------------------------------------------

BodyKind = Literal["tpl", "res", "err"]


class Body(msgspec.Struct, frozen=True, kw_only=True):
    """A request body (``tpl``), response body (``res``) or error envelope (``err``).

    The topic is compacted and keyed ``<kind>:<id>``; erasure publishes a tombstone."""

    kind: BodyKind
    ref: str
    text: str
    schema_version: int = SCHEMA_VERSION

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.ref}"


# --- deadletter.v1 -----------------------------------------------------------------------


class DeadLetter(Event, tag=True, frozen=True):
    source_topic: str
    partition: int
    offset: int
    key: str | None
    reason: str
    payload: str  # the rejected bytes, decoded as UTF-8 with replacement


AnyEvent = FileEvent | BatchEvent | GateInput | DispatchMessage | WorkerStarted | DeadLetter
