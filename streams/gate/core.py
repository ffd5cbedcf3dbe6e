"""The claim gate's decisions, free of I/O.

:class:`Gate` folds everything a gate partition hears — lifecycle events, executor reports and
heartbeats, model-filter changes, batch control and ticks — into per-request entries and
answers with the events to publish. Entries live in mutable mappings (changelog-backed Faust
tables in production, dicts in tests); the indexes below them (pending rows per batch, delayed
retries, in-flight sets, per-owner active counts) are derived and rebuilt by :meth:`rebuild`,
which is what a worker does after a rebalance.

What to claim is :func:`streams.gate.scoring.select` (capacity, fairness, urgency, model
filters, ramp, leaky bucket). This module adds the lifecycle around it: eligibility
(``not_before``, cancelled batches), fenced executor reports (a report counts only for the
request's current claim), first terminal result wins, cancellation of in-flight work, stale
claim reclaim, and unknown models failing their requests with a clear error.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping, MutableMapping
from datetime import datetime, timedelta
from typing import Any

import msgspec

from schemas import ids
from schemas.events import (
    AbortDispatch,
    Body,
    CancelBatchRequests,
    Dispatch,
    ExecutionFinished,
    ExecutionStarted,
    GateInput,
    GateTick,
    ModelFilterAppended,
    RequestCanceled,
    RequestClaimed,
    RequestCompleted,
    RequestEvent,
    RequestFailed,
    RequestReclaimed,
    RequestRetryScheduled,
    RequestsPending,
    RequestStarted,
    WorkerHeartbeat,
    WorkerStopped,
)
from streams.emit import Out
from streams.execution.failure import (
    BatchTerminated,
    FailureReason,
    RequestBuilderError,
    TaskTerminated,
)
from streams.gate import scoring
from streams.lifecycle import IN_FLIGHT, State


class Entry(msgspec.Struct):
    """What the gate remembers of one request. Terminal entries are kept (small) so that a
    redelivered ``RequestsPending`` can never bring a finished request back."""

    model: str
    state: State
    batch_id: str | None = None
    template_id: str = ""
    custom_id: str | None = None
    line: int = 0
    owner: str = ""
    created_at: datetime | None = None
    deadline: datetime | None = None
    window_s: float = 86400.0
    window_class: str = "24h"
    attempt: int = 0
    claims: int = 0
    claim_id: str | None = None
    claimed_at: datetime | None = None
    started_at: datetime | None = None
    worker_id: str | None = None  # the executor running it
    not_before: datetime | None = None
    cancel_requested: bool = False


class Liveness(msgspec.Struct, frozen=True):
    """When a claim is taken back (core §4.8) and how many attempts a request gets."""

    claim_timeout: timedelta = timedelta(seconds=60)
    processing_timeout: timedelta = timedelta(seconds=600)
    stale_worker: timedelta = timedelta(seconds=30)
    max_retries: int | None = 1000


_encoder = msgspec.msgpack.Encoder()
_entry_decoder = msgspec.msgpack.Decoder(Entry)


def encode_entry(entry: Entry) -> bytes:
    return _encoder.encode(entry)


def decode_entry(raw: bytes) -> Entry:
    return _entry_decoder.decode(raw)


def _bucket_key(key: scoring.BucketKey) -> str:
    return "\x1f".join(key)


class _ModelIndex:
    def __init__(self) -> None:
        # batch id ("" for batchless rows) -> heap of (created_at, line, request id)
        self.pending: dict[str, list[tuple[float, int, str]]] = {}
        self.delayed: list[tuple[float, str]] = []  # (not_before, request id)
        self.in_flight: set[str] = set()
        # Requests with an item in ``pending``: an item outlives a claim until it reaches the
        # head of its heap, and serves again if the request returns to pending meanwhile.
        self.queued: set[str] = set()


class Gate:
    def __init__(
        self,
        entries: MutableMapping[str, bytes],
        limits: Mapping[str, int],
        worker_id: str,
        cancelled: MutableMapping[str, bytes],
        *,
        model_states: MutableMapping[str, bytes] | None = None,
        buckets: MutableMapping[str, bytes] | None = None,
        config: scoring.GateConfig | None = None,
        liveness: Liveness | None = None,
    ) -> None:
        self.entries = entries
        self.limits = limits
        self.worker_id = worker_id
        self.cancelled = cancelled
        self.model_states = {} if model_states is None else model_states
        self.buckets = {} if buckets is None else buckets
        self.config = config or scoring.GateConfig()
        self.liveness = liveness or Liveness()
        self.models: dict[str, _ModelIndex] = {}
        self.owner_active: dict[str, int] = {}
        # Executor liveness is soft state, rebuilt from heartbeats within one interval.
        self.worker_seen: dict[str, datetime] = {}
        self.workers_dead: set[str] = set()
        self.started_at: datetime | None = None
        # Worker staleness is judged on the time of the newest heartbeat or tick handled, not
        # the wall clock: a gate catching up on a backlog must not take a worker for dead
        # because that worker's newer heartbeats are still queued behind the backlog.
        self.clock: datetime | None = None

    # -- state access ---------------------------------------------------------------------

    def _get(self, request_id: str) -> Entry | None:
        raw = self.entries.get(request_id)
        return None if raw is None else decode_entry(raw)

    def _put(self, request_id: str, entry: Entry) -> None:
        self.entries[request_id] = encode_entry(entry)

    def _index(self, model: str) -> _ModelIndex:
        index = self.models.get(model)
        if index is None:
            index = self.models[model] = _ModelIndex()
        return index

    def rebuild(self) -> None:
        """Derive every index from the entries (after a rebalance)."""
        self.models, self.owner_active = {}, {}
        for request_id, raw in self.entries.items():
            entry = decode_entry(raw)
            if entry.state == "pending":
                self._enqueue(request_id, entry)
            elif entry.state in IN_FLIGHT:
                self._index(entry.model).in_flight.add(request_id)
                self.owner_active[entry.owner] = self.owner_active.get(entry.owner, 0) + 1

    def _enqueue(self, request_id: str, entry: Entry) -> None:
        index = self._index(entry.model)
        if entry.not_before is not None:
            heapq.heappush(index.delayed, (entry.not_before.timestamp(), request_id))
            return
        if request_id in index.queued:
            return
        created = entry.created_at.timestamp() if entry.created_at else 0.0
        heap = index.pending.setdefault(entry.batch_id or "", [])
        heapq.heappush(heap, (created, entry.line, request_id))
        index.queued.add(request_id)

    def in_flight(self, model: str) -> int:
        index = self.models.get(model)
        return 0 if index is None else len(index.in_flight)

    # -- input ----------------------------------------------------------------------------

    def handle(self, message: GateInput, now: datetime) -> list[Out]:
        if self.started_at is None:
            self.started_at = now
        out: list[Out] = []
        model: str | None
        match message:
            case RequestsPending():
                self._on_pending(message, now, out)
                model = message.model
            case ExecutionStarted():
                self._on_started(message, now, out)
                model = message.model
            case ExecutionFinished():
                self._on_finished(message, now, out)
                model = message.model
            case CancelBatchRequests():
                self._on_cancel_batch(message, now, out)
                model = message.model
            case ModelFilterAppended():
                self.model_states[message.model] = message.state.encode()
                model = message.model
            case WorkerHeartbeat():
                self.worker_seen[message.worker_id] = message.occurred_at
                self._observe(message.occurred_at)
                return out
            case WorkerStopped():
                self.workers_dead.add(message.worker_id)
                return out
            case GateTick():
                model = message.model
                self._observe(message.occurred_at)
                self._reclaim_stale(model, now, out)
            case _:
                # A lifecycle event the gate itself published, read back. Its entry already
                # moved on (and may have moved further since): applying it again would undo
                # later decisions. After a crash the gate re-handles its uncommitted inputs and
                # re-makes the same decisions with the same ids instead (Faust flushes the
                # table changelog with the outputs before it commits an input).
                return out
        self._claim(model, now, out)
        return out

    def _observe(self, at: datetime) -> None:
        if self.clock is None or at > self.clock:
            self.clock = at

    def _move(self, request_id: str, entry: Entry, state: State) -> None:
        """Change state, keeping the in-flight set, owner counts and queues in step."""
        was, entry.state = entry.state, state
        index = self._index(entry.model)
        if was in IN_FLIGHT and state not in IN_FLIGHT:
            index.in_flight.discard(request_id)
            left = self.owner_active.get(entry.owner, 0) - 1
            if left > 0:
                self.owner_active[entry.owner] = left
            else:
                self.owner_active.pop(entry.owner, None)
        elif was not in IN_FLIGHT and state in IN_FLIGHT:
            index.in_flight.add(request_id)
            self.owner_active[entry.owner] = self.owner_active.get(entry.owner, 0) + 1
        if state == "pending":
            entry.claim_id = None
        self._put(request_id, entry)
        if state == "pending":
            self._enqueue(request_id, entry)

    def _on_pending(self, event: RequestsPending, now: datetime, out: list[Out]) -> None:
        known = event.model in self.limits
        cancelled = event.batch_id is not None and event.batch_id in self.cancelled
        for item in event.items:
            if item.request_id in self.entries:
                continue  # redelivered population: the request already exists
            entry = Entry(
                model=event.model,
                state="pending",
                batch_id=event.batch_id,
                template_id=item.template_id,
                custom_id=item.custom_id,
                line=item.line_number,
                owner=event.owner,
                created_at=event.created_at,
                deadline=event.deadline,
                window_s=event.window_s,
                window_class=event.window_class,
            )
            if cancelled:
                self._put(item.request_id, entry)
                self._end(item.request_id, entry, "canceled", now, out)
            elif not known:
                self._put(item.request_id, entry)
                reason = RequestBuilderError(error=f"model '{entry.model}' is not configured")
                self._end(item.request_id, entry, "failed", now, out, reason)
            else:
                self._put(item.request_id, entry)
                self._enqueue(item.request_id, entry)

    def _current(self, request_id: str, claim_id: str) -> Entry | None:
        """The entry if ``claim_id`` is its current claim and it is still in flight (fencing)."""
        entry = self._get(request_id)
        if entry is None or entry.claim_id != claim_id or entry.state not in IN_FLIGHT:
            return None
        return entry

    def _on_started(self, report: ExecutionStarted, now: datetime, out: list[Out]) -> None:
        entry = self._current(report.request_id, report.claim_id)
        if entry is None or entry.state != "claimed":
            return
        entry.worker_id, entry.started_at = report.worker_id, now
        self._emit(report.request_id, entry, "processing", out, RequestStarted(
            event_id=ids.event_id("started", report.claim_id), occurred_at=now,
            request_id=report.request_id, batch_id=entry.batch_id, model=entry.model,
            claim_id=report.claim_id, worker_id=report.worker_id,
        ))  # fmt: skip

    def _on_finished(self, report: ExecutionFinished, now: datetime, out: list[Out]) -> None:
        entry = self._current(report.request_id, report.claim_id)
        if entry is None:
            return  # fenced out: a stale claim, or the request already ended
        if entry.cancel_requested or report.result == "canceled":
            # Cancelled while in flight: it ends canceled, never completed after its cancel.
            self._end(report.request_id, entry, "canceled", now, out)
            return
        common: dict[str, Any] = {
            "occurred_at": now,
            "request_id": report.request_id,
            "batch_id": entry.batch_id,
            "model": entry.model,
        }
        if report.result == "completed":
            self._emit(report.request_id, entry, "completed", out, RequestCompleted(
                event_id=ids.event_id("terminal", report.request_id), claim_id=report.claim_id,
                status=report.status or 200, size=report.size,
                routed_model=report.routed_model or entry.model, attempt=entry.attempt, **common,
            ))  # fmt: skip
        elif report.result == "failed":
            self._emit(report.request_id, entry, "failed", out, RequestFailed(
                event_id=ids.event_id("terminal", report.request_id), claim_id=report.claim_id,
                error_type=report.error_type or "NetworkError", status=report.status,
                size=report.size, attempt=entry.attempt, **common,
            ))  # fmt: skip
        elif report.not_before is not None:
            entry.attempt, entry.not_before = entry.attempt + 1, report.not_before
            self._emit(report.request_id, entry, "pending", out, RequestRetryScheduled(
                event_id=ids.event_id("retry", report.claim_id), claim_id=report.claim_id,
                attempt=entry.attempt, not_before=report.not_before, **common,
            ))  # fmt: skip

    def _emit(
        self, request_id: str, entry: Entry, state: State, out: list[Out], event: RequestEvent
    ) -> None:
        self._move(request_id, entry, state)
        out.append(Out("requests", entry.model, event))

    def _end(
        self,
        request_id: str,
        entry: Entry,
        state: State,
        now: datetime,
        out: list[Out],
        reason: FailureReason | None = None,
    ) -> None:
        """End a request the gate itself decides on: canceled, or failed with ``reason``."""
        common: dict[str, Any] = {
            "event_id": ids.event_id("terminal", request_id),
            "occurred_at": now,
            "request_id": request_id,
            "batch_id": entry.batch_id,
            "model": entry.model,
        }
        if state == "canceled" or reason is None:
            self._emit(request_id, entry, "canceled", out, RequestCanceled(**common))
            return
        envelope = reason.to_json()
        out.append(
            Out("bodies", f"err:{request_id}", Body(kind="err", ref=request_id, text=envelope))
        )
        self._emit(request_id, entry, "failed", out, RequestFailed(
            claim_id=entry.claim_id, error_type=type(reason).__name__, status=None,
            size=len(envelope.encode()), attempt=entry.attempt, **common,
        ))  # fmt: skip

    def _on_cancel_batch(self, message: CancelBatchRequests, now: datetime, out: list[Out]) -> None:
        self.cancelled[message.batch_id] = b"1"
        index = self._index(message.model)
        for request_id in list(self._batch_rows(index, message.batch_id)):
            entry = self._get(request_id)
            if entry is None or entry.batch_id != message.batch_id:
                continue
            if entry.state == "pending":
                self._end(request_id, entry, "canceled", now, out)
            elif entry.state in IN_FLIGHT and not entry.cancel_requested and entry.claim_id:
                # Abort the upstream call; the executor's report then ends it canceled.
                entry.cancel_requested = True
                self._put(request_id, entry)
                abort = AbortDispatch(
                    event_id=ids.event_id("abort", entry.claim_id), occurred_at=now,
                    request_id=request_id, claim_id=entry.claim_id,
                )  # fmt: skip
                out.append(Out("dispatch", request_id, abort))

    @staticmethod
    def _batch_rows(index: _ModelIndex, batch_id: str) -> Iterator[str]:
        yield from (item[2] for item in index.pending.get(batch_id, ()))
        yield from (item[1] for item in index.delayed)
        yield from index.in_flight

    # -- reclaim --------------------------------------------------------------------------

    def _reclaim_stale(self, model: str, now: datetime, out: list[Out]) -> None:
        index = self.models.get(model)
        if index is None:
            return
        for request_id in list(index.in_flight):
            entry = self._get(request_id)
            if entry is None or entry.claim_id is None:
                continue
            reason = self._stale_reason(entry, now)
            if reason is None:
                continue
            if entry.cancel_requested:
                self._end(request_id, entry, "canceled", now, out)
                continue
            attempt = entry.attempt + 1
            limit = self.liveness.max_retries
            if limit is not None and attempt > limit:
                self._end(request_id, entry, "failed", now, out, TaskTerminated())
                continue
            old_claim, entry.attempt = entry.claim_id, attempt
            self._emit(request_id, entry, "pending", out, RequestReclaimed(
                event_id=ids.event_id("reclaimed", old_claim), occurred_at=now,
                request_id=request_id, batch_id=entry.batch_id, model=entry.model,
                claim_id=old_claim, attempt=attempt, reason=reason,
            ))  # fmt: skip

    def _stale_reason(self, entry: Entry, now: datetime) -> Any:
        live = self.liveness
        if entry.state == "claimed":
            claimed = entry.claimed_at or now
            return "claim_timeout" if now - claimed > live.claim_timeout else None
        if entry.worker_id in self.workers_dead:
            return "worker_dead"
        if entry.started_at is not None and now - entry.started_at > live.processing_timeout:
            return "processing_timeout"
        seen = self.worker_seen.get(entry.worker_id or "")
        # A worker never heard from since this gate started gets the threshold from the start.
        last = seen or self.started_at or now
        if (self.clock or now) - last > live.stale_worker:
            return "worker_stale"
        return None

    # -- claiming -------------------------------------------------------------------------

    def _claim(self, model: str, now: datetime, out: list[Out]) -> None:
        index = self.models.get(model)
        if index is None:
            return
        self._release_due(index, now)
        self._expire_overdue(index, now, out)
        capacity = min(
            self.limits.get(model, 0) - len(index.in_flight), self.config.claim_batch_size
        )
        if capacity <= 0:
            return
        candidates = list(self._candidates(index, model, capacity))
        if not candidates:
            return
        state = self.model_states.get(model)
        live = scoring.is_live(None if state is None else state.decode())
        buckets = self._buckets(model, now)
        chosen = scoring.select(
            model,
            capacity,
            candidates,
            self.owner_active,
            live,
            scoring.cooldown(buckets, now),
            now,
            self.config,
        )
        for key, at in scoring.leak_stamps(
            chosen, model, now, self.config.leaks_per_window
        ).items():
            self.buckets[_bucket_key(key)] = at.isoformat().encode()
        for pick in chosen:
            entry = self._get(pick.request_id)
            if entry is not None:
                self._claim_one(pick.request_id, entry, now, out)

    def _expire_overdue(self, index: _ModelIndex, now: datetime, out: list[Out]) -> None:
        """Expiry (README decisions): a batch past its deadline claims nothing more; its unsent
        rows fail ``BatchTerminated``. Rows in flight finish, with no retry past the deadline."""
        for batch_id, heap in list(index.pending.items()):
            if not batch_id or not heap or batch_id in self.cancelled:
                continue
            head = self._get(heap[0][2])  # rows of a batch share its deadline
            if head is None or head.deadline is None or head.deadline > now:
                continue
            del index.pending[batch_id]
            for _, _, request_id in heap:
                index.queued.discard(request_id)
                entry = self._get(request_id)
                if entry is not None and entry.state == "pending":
                    self._end(request_id, entry, "failed", now, out, BatchTerminated())

    def _release_due(self, index: _ModelIndex, now: datetime) -> None:
        while index.delayed and index.delayed[0][0] <= now.timestamp():
            _, request_id = heapq.heappop(index.delayed)
            entry = self._get(request_id)
            if entry is not None and entry.state == "pending" and entry.not_before is not None:
                entry.not_before = None
                self._put(request_id, entry)
                self._enqueue(request_id, entry)

    def _candidates(
        self, index: _ModelIndex, model: str, capacity: int
    ) -> Iterator[scoring.Candidate]:
        """Up to ``capacity`` claimable rows of each batch (and of the batchless rows): the
        most any batch can contribute to one cycle, so ranking never scans every row."""
        for batch_id, heap in list(index.pending.items()):
            if batch_id and batch_id in self.cancelled:
                continue  # its rows are canceled by the batch's cancel message
            while heap and not _claimable(self._get(heap[0][2])):
                index.queued.discard(heapq.heappop(heap)[2])  # stale: the request moved on
            if not heap:
                del index.pending[batch_id]
                continue
            wanted = capacity if batch_id else len(heap)
            for request_id, entry in self._first_claimable(heap, wanted):
                assert entry.deadline is not None
                yield scoring.Candidate(
                    request_id=request_id, model=model, owner=entry.owner, batch_id=entry.batch_id,
                    deadline=entry.deadline, created_at=entry.created_at or entry.deadline,
                    line=entry.line, window_s=entry.window_s, window_class=entry.window_class,
                )  # fmt: skip

    def _first_claimable(
        self, heap: list[tuple[float, int, str]], wanted: int
    ) -> list[tuple[str, Entry]]:
        """The ``wanted`` first claimable rows of a heap, looking past stale items inside it.
        Walks the heap in order without sorting it, so a cycle costs O(wanted·log wanted)
        whatever the backlog."""
        found: list[tuple[str, Entry]] = []
        for _, _, request_id in _in_order(heap):
            if len(found) >= wanted:
                break
            entry = self._get(request_id)
            if _claimable(entry):
                assert entry is not None
                found.append((request_id, entry))
        return found

    def _buckets(self, model: str, now: datetime) -> dict[scoring.BucketKey, datetime]:
        found: dict[scoring.BucketKey, datetime] = {}
        for key, raw in list(self.buckets.items()):
            owner, window_class, bucket_model = key.split("\x1f")
            at = datetime.fromisoformat(raw.decode())
            if at <= now:
                del self.buckets[key]  # the token is back: no state left to keep
            elif bucket_model == model:
                found[(owner, window_class, bucket_model)] = at
        return found

    def _claim_one(self, request_id: str, entry: Entry, now: datetime, out: list[Out]) -> None:
        entry.claims += 1
        claim_id = ids.derived("claim", request_id, entry.claims)
        entry.claim_id, entry.claimed_at = claim_id, now
        entry.worker_id = entry.started_at = None
        self._emit(request_id, entry, "claimed", out, RequestClaimed(
            event_id=ids.event_id("claimed", claim_id), occurred_at=now, request_id=request_id,
            batch_id=entry.batch_id, model=entry.model, claim_id=claim_id,
            worker_id=self.worker_id, attempt=entry.attempt,
        ))  # fmt: skip
        assert entry.deadline is not None
        dispatch = Dispatch(
            event_id=ids.event_id("dispatch", claim_id), occurred_at=now, request_id=request_id,
            batch_id=entry.batch_id, template_id=entry.template_id, custom_id=entry.custom_id,
            model=entry.model, claim_id=claim_id, attempt=entry.attempt, deadline=entry.deadline,
        )  # fmt: skip
        out.append(Out("dispatch", request_id, dispatch))


def _in_order(heap: list[tuple[float, int, str]]) -> Iterator[tuple[float, int, str]]:
    """A heap's items in ascending order, lazily: a frontier of candidate positions starting
    at the root, each popped position adding its two children."""
    frontier = [(heap[0], 0)] if heap else []
    while frontier:
        item, position = heapq.heappop(frontier)
        yield item
        for child in (2 * position + 1, 2 * position + 2):
            if child < len(heap):
                heapq.heappush(frontier, (heap[child], child))


def _claimable(entry: Entry | None) -> bool:
    """Pending with no retry delay; batch-level eligibility is checked per batch."""
    return entry is not None and entry.state == "pending" and entry.not_before is None
