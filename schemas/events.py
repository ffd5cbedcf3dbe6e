"""Events: the facts Cannonade records on Kafka.

Every event is a msgspec Struct tagged by its class name in the ``type`` field and carries
``event_id``, ``occurred_at`` and ``schema_version``. Lifecycle events carry ids, states,
status codes, sizes and times only: prompt and completion text travels on the bodies topic
(:mod:`schemas.bodies`), so analytics consumers of the lifecycle never see user content.

Event ids of decisions are deterministic (see :func:`schemas.ids.event_id`), so a redelivered
decision is recognisable as the same event rather than a second one.

The claim gate publishes the request lifecycle in :class:`RequestTransitions` records, one per
decision cycle; each holds ordinary per-request events, so a plain consumer expands a record
by iterating its ``events``.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from schemas.bodies import BodyRef
from schemas.types import MAX_INT4, Name, NonNegative, Text, Timestamp, Uuid, Window

SCHEMA_VERSION = 1

State = Literal["pending", "claimed", "processing", "completed", "failed", "canceled"]


class Event(msgspec.Struct, kw_only=True, frozen=True, tag_field="type"):
    event_id: str
    occurred_at: Timestamp
    schema_version: int = SCHEMA_VERSION


# --- files.v1 (key: file_id) -------------------------------------------------------------


class TemplateMeta(msgspec.Struct, frozen=True, array_like=True):
    """One uploaded line without its body: [custom_id, method, path, model, body_size]."""

    custom_id: Text | None
    method: Name
    path: Name
    model: Name
    body_size: NonNegative


class TemplatesAppended(Event, tag=True, frozen=True):
    """Lines ``first_line…`` of a file; their bodies are the chunk record ``body_key`` at
    ``body`` on the bodies topic (line ``first_line + i`` is the chunk's line ``i``). A template
    is named by its file and line."""

    file_id: Uuid
    first_line: NonNegative
    body_key: str
    body: BodyRef
    templates: list[TemplateMeta]

    def __post_init__(self) -> None:
        # Line numbers are int4 in the read model, whose COPY cannot refuse one per record.
        if self.first_line + len(self.templates) > MAX_INT4 + 1:
            raise ValueError(f"lines past {MAX_INT4}")


class FileUploaded(Event, tag=True, frozen=True):
    """Published after every TemplatesAppended of the file, on the same partition."""

    file_id: Uuid
    owner: Name
    filename: Text
    purpose: str
    bytes: int
    created_at: Timestamp
    expires_at: Timestamp | None
    template_count: int
    api_key_id: Uuid | None = None


class UploadAbandoned(Event, tag=True, frozen=True):
    """The lines ``upload_id`` appended to a file that was never created are void (the
    upload failed part-way): their templates go."""

    file_id: Uuid
    upload_id: Uuid


class FileDeleted(Event, tag=True, frozen=True):
    file_id: Uuid


FileEvent = TemplatesAppended | FileUploaded | UploadAbandoned | FileDeleted


# --- batches.v1 (key: batch_id) ----------------------------------------------------------


class BatchCreated(Event, tag=True, frozen=True):
    batch_id: Uuid
    owner: Name
    input_file_id: Uuid
    endpoint: Name
    completion_window: Window
    metadata: dict[str, Text] | None
    created_at: Timestamp
    expires_at: Timestamp
    output_file_id: Uuid
    error_file_id: Uuid
    api_key_id: Uuid | None = None


class BatchRejected(Event, tag=True, frozen=True):
    """A CreateBatch that broke a rule (missing file, wrong purpose, disallowed window…): the
    verdict the API answers its caller with, as an HTTP status and an error envelope."""

    batch_id: Uuid
    owner: Name
    status: int
    message: Text
    code: str | None = None
    param: str | None = None


class BatchPopulated(Event, tag=True, frozen=True):
    batch_id: Uuid
    total: int
    models: dict[str, int]  # requests per model


class BatchPopulationFailed(Event, tag=True, frozen=True):
    batch_id: Uuid
    message: Text


class BatchCancelRequested(Event, tag=True, frozen=True):
    batch_id: Uuid


class BatchRetried(Event, tag=True, frozen=True):
    """The batch's failed (and, for a whole-batch retry, canceled) rows go back to pending:
    its terminal stamps and frozen counts are cleared, ``retry_version`` moves on, and an
    expired batch gets a new deadline (core §2.3, README decisions)."""

    batch_id: Uuid
    retry_version: int
    scope: Literal["batch", "requests"]
    rows: int
    expires_at: Timestamp


class BatchDeleted(Event, tag=True, frozen=True):
    """Soft delete (core §2.3): the batch and its output and error files vanish from reads at
    once; a running batch is cancelled too. With ``erase`` (a user's erasure) its metadata is
    cleared as well."""

    batch_id: Uuid
    erase: bool = False


class NotifiedDelivery(msgspec.Struct, frozen=True, array_like=True):
    """One webhook endpoint a batch notification goes to: [delivery_id, webhook_id]."""

    delivery_id: Uuid
    webhook_id: Uuid


class BatchNotified(Event, tag=True, frozen=True):
    """The batch reached a terminal state and its owner's webhook endpoints are to hear of it
    (core §4.9 ``notification_sent_at``), once per ``retry_version``: the first of these for a
    version wins, later ones (a replica that raced) change nothing. ``event_type`` is the
    OpenAI event (``batch.completed``…) and ``notification_id`` its ``evt_`` id; each delivery
    is one endpoint's copy, retried until delivered (``WebhookAttempted``)."""

    batch_id: Uuid
    owner: Name
    retry_version: int
    event_type: str
    notification_id: str
    terminal_at: Timestamp  # the event's created_at: when the batch ended
    deliveries: list[NotifiedDelivery] = []


BatchEvent = (
    BatchCreated
    | BatchRejected
    | BatchPopulated
    | BatchPopulationFailed
    | BatchCancelRequested
    | BatchRetried
    | BatchDeleted
    | BatchNotified
)


# --- requests.v1 (key: model): the request lifecycle --------------------------------------


class PendingItem(msgspec.Struct, frozen=True, array_like=True):
    request_id: Uuid
    line_number: int


class RequestsPending(Event, tag=True, frozen=True):
    """A chunk of a batch's rows becoming pending (population), all of one model. A row's
    template is line ``line_number`` of ``file_id``."""

    batch_id: Uuid
    file_id: Uuid
    model: Name
    owner: Name
    created_at: Timestamp
    deadline: Timestamp
    window_class: str
    service_tier: str | None
    items: list[PendingItem]
    # W of core §3.2: for batch rows expires_at − batch created_at (not the window text).
    window_s: float = 86400.0


class _Transition(Event, frozen=True):
    """One request's move out of ``from_state`` (the state machine of streams.lifecycle)."""

    request_id: Uuid
    batch_id: Uuid | None
    model: Name
    from_state: State


class RequestClaimed(_Transition, tag=True, frozen=True):
    claim_id: Uuid
    worker_id: str
    attempt: int


class RequestStarted(_Transition, tag=True, frozen=True):
    claim_id: Uuid
    worker_id: str


class RequestCompleted(_Transition, tag=True, frozen=True):
    claim_id: Uuid | None
    status: int
    size: int
    routed_model: str
    attempt: int


class RequestFailed(_Transition, tag=True, frozen=True):
    claim_id: Uuid | None
    error_type: str  # the FailureReason variant
    status: int | None
    size: int
    attempt: int
    # The envelope when the engine decided the failure itself (BatchTerminated, TaskTerminated,
    # RequestBuilderError): it holds no user content. An upstream failure's envelope quotes
    # the upstream body, so it travels on the bodies topic instead (``err:<request_id>``).
    error: str | None = None


class RequestRetryScheduled(_Transition, tag=True, frozen=True):
    claim_id: Uuid
    attempt: int  # the attempt that will run next
    not_before: Timestamp


class RequestCanceled(_Transition, tag=True, frozen=True):
    pass


class RequestRetried(_Transition, tag=True, frozen=True):
    """An explicit retry (core §2.3, §2.4): a failed or canceled row back to pending at
    attempt 0, every result and claim field cleared."""

    retry_version: int = 0


class RequestErased(Event, tag=True, frozen=True):
    """Right to erasure (core §2.4 delete_request): the row is gone, from any state, its bodies
    were tombstoned, and a batch row leaves its batch's totals; a replay deletes it again."""

    request_id: Uuid
    batch_id: Uuid | None
    model: Name


class BatchlessFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What a request without a batch knows of itself (flex, realtime, step sub-requests)."""

    owner: Name
    path: Name
    # "flex" for flex rows; "priority" for realtime rows and step sub-requests (core §1.4.4).
    service_tier: str | None
    created_at: Timestamp
    deadline: Timestamp
    background: bool = False  # /v1/responses: answered 202 and polled
    api_key_id: Uuid | None = None


class RequestCreated(Event, tag=True, frozen=True):
    """A request without a batch comes to be: ``pending`` (flex, by the claim gate) or
    ``processing`` (realtime by the API, a step sub-request by the chain agent; never
    claimed). Creating one that exists changes nothing (core §2.6, responses §5)."""

    request_id: Uuid
    model: Name
    state: Literal["pending", "processing"]
    facts: BatchlessFacts
    batch_id: None = None


class RealtimeCompletionReported(Event, tag=True, frozen=True):
    """The outcome of a request that was never claimed (realtime, a step sub-request), applied
    with responses §5: a ``processing`` row ends completed (2xx) or failed (the
    NonRetriableHttpStatus envelope, on the bodies topic as ``err:``); a row that already
    ended is left as it is; a missing row is created in its final state from ``facts``."""

    request_id: Uuid
    model: Name
    status: int
    size: int
    facts: BatchlessFacts
    batch_id: None = None


class RequestReclaimed(_Transition, tag=True, frozen=True):
    """A claim returned to pending: taken back as stale (core §4.8; counts as an attempt), or
    handed back by an executor that did not run it (``not_sent``; the attempt is kept)."""

    claim_id: Uuid
    attempt: int  # the attempt that will run next
    reason: Literal[
        "claim_timeout", "processing_timeout", "worker_dead", "worker_stale", "not_sent"
    ]


#: The events that move a row from a state (``from_state``) to the next.
RequestTransition = (
    RequestRetried
    | RequestClaimed
    | RequestStarted
    | RequestCompleted
    | RequestFailed
    | RequestRetryScheduled
    | RequestCanceled
    | RequestReclaimed
)
RequestEvent = (
    RequestsPending
    | RequestCreated
    | RealtimeCompletionReported
    | RequestErased
    | RequestTransition
)


class RequestTransitions(Event, tag=True, frozen=True):
    """The lifecycle events of one gate decision about ``model``, in order."""

    model: Name
    events: list[RequestEvent]


# --- gate.v1 (key: model): what the claim gate hears besides model filters -----------------


class SourceMark(msgspec.Struct, frozen=True, array_like=True):
    """Where a gate input came from: the commands record that produced it and its position
    among that record's outputs. The gate applies each mark once, so a command handled twice
    after a crash does not populate twice."""

    partition: int
    offset: int
    seq: int


class LineRange(msgspec.Struct, frozen=True, array_like=True):
    start: int
    end: int  # exclusive


class ChunkRef(msgspec.Struct, frozen=True, array_like=True):
    """Lines ``first_line … first_line + count − 1`` of a file are one chunk record."""

    first_line: int
    count: int
    partition: int
    offset: int

    def body(self, line: int) -> BodyRef:
        return BodyRef(self.partition, self.offset, line - self.first_line)


class BatchFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What the gate and the executor need to know of a batch."""

    retry_version: int = 0
    batch_id: Uuid
    file_id: Uuid
    owner: Name
    created_at: Timestamp
    deadline: Timestamp  # expires_at
    window_class: str  # the completion_window text
    window_s: float
    path: Name  # the batch endpoint: every line's url
    service_tier: str | None = None
    # x-fusillade-batch-* header values (core §4.4), computed at population.
    headers: dict[str, str] = {}


class PendingRequests(Event, tag=True, frozen=True):
    """Population of a batch's rows of ``model``: the lines in ``ranges`` become pending."""

    source: SourceMark
    batch: BatchFacts
    model: Name
    ranges: list[LineRange]
    chunks: list[ChunkRef]


class RequestSubmitted(Event, tag=True, frozen=True):
    """A flex request for the claim gate (from the commands agent)."""

    source: SourceMark
    request_id: Uuid
    model: Name
    facts: BatchlessFacts
    body: BodyRef


class RetryRows(Event, tag=True, frozen=True):
    """A batch's rows of ``model`` to run again (from the commands agent): the gate makes them
    pending unless they are live, under the batch's new ``retry_version`` and deadline. Every
    model of the batch hears of a retry, the ones with no rows named too: the deadline renews
    everywhere, and a whole-batch retry (``scope`` batch: resume after a cancel) runs again
    the rows the cancel stopped in flight."""

    source: SourceMark
    batch: BatchFacts
    model: Name
    failed: list[LineRange]
    canceled: list[LineRange]
    chunks: list[ChunkRef]
    scope: Literal["batch", "requests"] = "batch"


class RequestControl(Event, tag=True, frozen=True):
    """A batchless request cancelled, retried or erased by its owner (from the commands agent).
    A retry carries the request's facts and body again: the gate forgot the row when it
    ended."""

    source: SourceMark
    request_id: Uuid
    model: Name
    action: Literal["cancel", "retry", "erase"]
    facts: BatchlessFacts | None = None
    body: BodyRef | None = None


class StartedItem(msgspec.Struct, frozen=True, array_like=True):
    request_id: str
    claim_id: str


ExecutionResult = Literal["completed", "failed", "retry", "canceled", "not_sent"]


class FinishedItem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    request_id: str
    claim_id: str
    result: ExecutionResult
    status: int | None = None
    size: int = 0
    error_type: str | None = None
    routed_model: str | None = None
    not_before: Timestamp | None = None  # with result == "retry"


class ExecutionReport(Event, tag=True, frozen=True):
    """An executor's news about claims of ``model``: calls it started, and calls that ended
    (which implies they started). Exactly one finished item ends every claim it received."""

    worker_id: str
    model: Name
    started: list[StartedItem] = []
    finished: list[FinishedItem] = []


class CancelBatchRequests(Event, tag=True, frozen=True):
    """Tells the gate partition owning ``model`` to cancel the batch's rows. The gate applies
    its ``source`` once (a cancel read again after a crash must not stop a resumed batch);
    one without a source is applied whenever it comes."""

    batch_id: Uuid
    model: Name
    source: SourceMark | None = None


class GateTick(Event, tag=True, frozen=True):
    """Wakes the gate for time-driven eligibility (retry ``not_before``, stale claims)."""

    model: Name


# --- model-filters.v1 (compacted; key: model) ----------------------------------------------

ModelState = Literal["live", "coming", "absent", "leaving"]


class ModelFilterAppended(Event, tag=True, frozen=True):
    """A model's liveness (core §1.6). Compaction keeps the latest event per model forever."""

    model: Name
    state: ModelState
    expected_ready_at: Timestamp | None = None


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
    PendingRequests
    | RequestSubmitted
    | RetryRows
    | RequestControl
    | ExecutionReport
    | CancelBatchRequests
    | GateTick
    | ModelFilterAppended
    | WorkerHeartbeat
    | WorkerStopped
)


# --- dispatch.v1 (partition chosen by the gate) ------------------------------------------


class DispatchItem(msgspec.Struct, frozen=True, kw_only=True):
    """A claimed request for an executor. No body and no credentials: the executor reads the
    body from the bodies topic at ``body`` and the upstream key from its model configuration."""

    request_id: str
    claim_id: str
    batch_id: str | None
    model: str
    path: str
    attempt: int
    deadline: Timestamp
    claimed_at: Timestamp
    body: BodyRef
    owner: str = ""  # whose server-side tools a /v1/responses request may use
    # With prefetch (gate.prefetch > 0): the model's lane (0 .. limit - 1) this claim runs in.
    # An executor runs a lane's claims one at a time, in order, so a claim queued behind a
    # running call starts the moment that call ends; -1 = no lane, start at once.
    lane: int = -1


class DispatchBatch(Event, tag=True, frozen=True):
    """Claims of one gate cycle for one dispatch partition, with the header values of the
    batches they belong to."""

    items: list[DispatchItem]
    batch_headers: dict[str, dict[str, str]] = {}


class AbortDispatch(Event, tag=True, frozen=True):
    """Abort a running claim (its batch was cancelled or expired); sent to the partition of
    its dispatch, so it reaches the executor that holds it."""

    request_id: str
    claim_id: str


DispatchMessage = DispatchBatch | AbortDispatch


# --- responses.v1 (key: response uuid): multi-step chains (responses-and-api §1–§3, §9) -----

StepKind = Literal["model_call", "tool_call"]


class ChainHead(msgspec.Struct, frozen=True):
    """A head row the claim gate claimed (flex, batch line): the chain ends it by reporting
    the claim's outcome to the gate. A realtime head has none: the chain ends it with a
    RealtimeCompletionReported."""

    claim_id: str
    model: str
    batch_id: str | None = None


class ChainStarted(Event, tag=True, frozen=True):
    """A /v1/responses request with tools becomes a chain, headed by its own request row
    (head step id = response uuid = request id)."""

    response_id: Uuid
    model: Name
    parent: BodyRef  # the request body (after tool injection) on the bodies topic
    resolved_tool_names: list[str]
    facts: BatchlessFacts
    head: ChainHead | None = None
    max_iterations: int = 10


class StepRecorded(Event, tag=True, frozen=True):
    """A step of the chain (§1.1), pending; its request payload is on the bodies topic."""

    response_id: Uuid
    step_id: Uuid
    request_id: Uuid | None  # model_call: its request row; tool_call: none
    prev_step_id: Uuid | None
    parent_step_id: Uuid | None
    kind: StepKind
    sequence: int
    payload: BodyRef
    tool: str | None = None  # tool_call: the tool's name


class StepStarted(Event, tag=True, frozen=True):
    response_id: Uuid
    step_id: Uuid


class StepCompleted(Event, tag=True, frozen=True):
    response_id: Uuid
    step_id: Uuid
    payload: BodyRef


class StepFailed(Event, tag=True, frozen=True):
    response_id: Uuid
    step_id: Uuid
    error: BodyRef


class ResponseFinalized(Event, tag=True, frozen=True):
    """The chain's end (§2.11): status 200 and the assembled response, or the failure; a
    chain aborted by the gate (status 499) leaves no body, as a canceled row has none."""

    response_id: Uuid
    status: int
    body: BodyRef | None


class ChainAborted(Event, tag=True, frozen=True):
    """The claim gate stopped the claim that holds a chain's head (its batch cancelled or
    expired, the request cancelled or erased): the chain ends there, reporting the claim
    canceled; an erased one ends without a trace."""

    response_id: Uuid
    claim_id: Uuid
    erased: bool = False


ChainEvent = (
    ChainStarted
    | StepRecorded
    | StepStarted
    | StepCompleted
    | StepFailed
    | ResponseFinalized
    | ChainAborted
)


# --- step-work.v1 (key: response uuid): work items of the step executors --------------------


class StepWork(Event, tag=True, frozen=True):
    """Run one step: a model call (its chat-completions payload) or a server-side tool call
    (``{"name", "args", "call_id"}``). The step executor reports on responses.v1."""

    response_id: Uuid
    step_id: Uuid
    sequence: int
    kind: StepKind
    payload: BodyRef
    model: Name
    owner: Name
    request_id: Uuid | None = None
    tool: str | None = None


# --- keys.v1 (compacted; key: key_id) ------------------------------------------------------


class ApiKey(Event, tag=True, frozen=True):
    """An API key's current state. Only the sha256 of the secret travels; the secret is shown
    once to whoever created the key and is never stored."""

    key_id: Uuid
    user: Name
    key_hash: str  # hex sha256 of the secret
    created_at: Timestamp
    revoked_at: Timestamp | None = None


# --- deadletter.v1 -----------------------------------------------------------------------


class DeadLetter(Event, tag=True, frozen=True):
    source_topic: str
    partition: int
    offset: int
    key: str | None
    reason: str
    payload: str  # the rejected bytes, decoded as UTF-8 with replacement (may be truncated)


# --- webhooks.v1 (compacted; key: webhook_id) and webhook-deliveries.v1 (key: delivery_id) --


class EncryptedSecret(msgspec.Struct, frozen=True):
    """A webhook signing secret sealed with AES-256-GCM under the configured key ``key_id``
    (base64 of nonce + ciphertext; the webhook id is the associated data, so a sealed secret
    cannot be moved to another endpoint). Only processes holding the key can sign."""

    key_id: str
    sealed: str


class WebhookEndpoint(Event, tag=True, frozen=True):
    """A webhook endpoint's current state (compaction keeps the latest). A deleted endpoint's
    record drops its secret, so the sealed secret leaves the topic at the next compaction."""

    webhook_id: Uuid
    owner: Name
    url: Text
    name: Text
    event_types: list[str]
    created_at: Timestamp
    secret: EncryptedSecret | None
    secret_hint: str
    deleted_at: Timestamp | None = None


class WebhookAttempted(Event, tag=True, frozen=True):
    """One attempt to deliver a batch notification to one endpoint: its HTTP outcome and what
    follows (``delivered``; ``retry`` at ``next_attempt_at``; ``failed``: no more tries)."""

    delivery_id: Uuid
    webhook_id: Uuid
    batch_id: Uuid
    attempt: int  # 1, 2, ...
    attempted_at: Timestamp
    outcome: Literal["delivered", "retry", "failed"]
    status_code: int | None = None
    error: str | None = None
    duration_ms: int = 0
    next_attempt_at: Timestamp | None = None
