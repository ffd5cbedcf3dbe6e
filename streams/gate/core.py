"""The claim gate's decisions, free of I/O.

:class:`Gate` folds everything a gate partition hears — lifecycle events, executor reports,
batch control and ticks — into per-request entries and answers with the events to publish.
Entries live in a mutable mapping (a changelog-backed Faust table in production, a dict in
tests); the pending heaps and in-flight counts are derived from them and can be rebuilt at any
time with :meth:`Gate.rebuild`, which is what a worker does after a rebalance.

Rules honoured here: per-model concurrency limits, deadline order between batches and line
order within one, ``not_before`` for retries, cancelled batches never claimed, fenced executor
reports (a report counts only for the current claim), first terminal result wins, and an
unknown model fails its requests with a clear error.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, MutableMapping
from datetime import datetime
from typing import Any

import msgspec

from schemas import ids
from schemas.events import (
    Body,
    CancelBatchRequests,
    Dispatch,
    ExecutionFinished,
    ExecutionStarted,
    GateInput,
    GateTick,
    RequestCanceled,
    RequestClaimed,
    RequestCompleted,
    RequestEvent,
    RequestFailed,
    RequestRetryScheduled,
    RequestsPending,
    RequestStarted,
)
from streams.emit import Out
from streams.execution.failure import RequestBuilderError
from streams.lifecycle import IN_FLIGHT, State, next_state


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
    deadline: datetime | None = None
    attempt: int = 0
    claims: int = 0
    claim_id: str | None = None
    not_before: datetime | None = None


_entry_codec = msgspec.msgpack.Encoder()
_entry_decoder = msgspec.msgpack.Decoder(Entry)


def encode_entry(entry: Entry) -> bytes:
    return _entry_codec.encode(entry)


def decode_entry(raw: bytes) -> Entry:
    return _entry_decoder.decode(raw)


class _ModelIndex:
    def __init__(self) -> None:
        # (deadline, batch, line, request_id): earliest deadline first, then upload order.
        self.heap: list[tuple[float, str, int, str]] = []
        self.in_flight = 0


class Gate:
    def __init__(
        self,
        entries: MutableMapping[str, bytes],
        limits: Mapping[str, int],
        worker_id: str,
        cancelled: MutableMapping[str, bytes],
    ) -> None:
        self.entries = entries
        self.limits = limits
        self.worker_id = worker_id
        self.cancelled = cancelled
        self.models: dict[str, _ModelIndex] = {}

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
        """Derive the heaps and in-flight counts from the entries (after a rebalance)."""
        self.models = {}
        for request_id, raw in self.entries.items():
            entry = decode_entry(raw)
            if entry.state == "pending":
                self._push(request_id, entry)
            elif entry.state in IN_FLIGHT:
                self._index(entry.model).in_flight += 1

    def _push(self, request_id: str, entry: Entry) -> None:
        deadline = entry.deadline.timestamp() if entry.deadline else float("inf")
        heapq.heappush(
            self._index(entry.model).heap, (deadline, entry.batch_id or "", entry.line, request_id)
        )

    # -- input ----------------------------------------------------------------------------

    def handle(self, message: GateInput, now: datetime) -> list[Out]:
        out: list[Out] = []
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
            case GateTick():
                model = message.model
            case _:
                # A lifecycle event the gate itself published (or a peer did): fold it in so
                # the entries converge on the log even if a table write was lost in a crash.
                self._fold(message)
                model = message.model
        self._claim(model, now, out)
        return out

    def _fold(self, event: RequestEvent) -> None:
        request_id = getattr(event, "request_id", None)
        if request_id is None:
            return
        entry = self._get(request_id)
        if entry is None:
            return
        state = next_state(entry.state, event)
        if state is None:
            return
        was = entry.state
        entry.state = state
        if isinstance(event, RequestClaimed):
            entry.claim_id, entry.attempt = event.claim_id, event.attempt
        elif isinstance(event, RequestRetryScheduled):
            entry.attempt, entry.not_before = event.attempt, event.not_before
        self._put(request_id, entry)
        self._account(entry, was)

    def _account(self, entry: Entry, was: State) -> None:
        """Keep the derived index in step with a state change of ``entry``."""
        index = self._index(entry.model)
        if was in IN_FLIGHT and entry.state not in IN_FLIGHT:
            index.in_flight -= 1
        elif was not in IN_FLIGHT and entry.state in IN_FLIGHT:
            index.in_flight += 1

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
                deadline=event.deadline,
            )
            if cancelled:
                self._cancel(item.request_id, entry, now, out)
            elif not known:
                self._fail_unknown_model(item.request_id, entry, now, out)
            else:
                self._put(item.request_id, entry)
                self._push(item.request_id, entry)

    def _fail_unknown_model(
        self, request_id: str, entry: Entry, now: datetime, out: list[Out]
    ) -> None:
        envelope = RequestBuilderError(f"model '{entry.model}' is not configured").to_json()
        entry.state = "failed"
        self._put(request_id, entry)
        out.append(
            Out("bodies", f"err:{request_id}", Body(kind="err", ref=request_id, text=envelope))
        )
        out.append(
            Out(
                "requests",
                entry.model,
                RequestFailed(
                    event_id=ids.event_id("terminal", request_id),
                    occurred_at=now,
                    request_id=request_id,
                    batch_id=entry.batch_id,
                    model=entry.model,
                    claim_id=None,
                    error_type="RequestBuilderError",
                    status=None,
                    size=len(envelope.encode()),
                    attempt=entry.attempt,
                ),
            )
        )

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
        event = RequestStarted(
            event_id=ids.event_id("started", report.claim_id),
            occurred_at=now,
            request_id=report.request_id,
            batch_id=entry.batch_id,
            model=entry.model,
            claim_id=report.claim_id,
            worker_id=report.worker_id,
        )
        self._transition(report.request_id, entry, event, out)

    def _on_finished(self, report: ExecutionFinished, now: datetime, out: list[Out]) -> None:
        entry = self._current(report.request_id, report.claim_id)
        if entry is None:
            return  # fenced out: a stale claim, or the request already ended
        common: dict[str, Any] = {
            "occurred_at": now,
            "request_id": report.request_id,
            "batch_id": entry.batch_id,
            "model": entry.model,
        }
        event: RequestEvent
        if report.result == "completed":
            event = RequestCompleted(
                event_id=ids.event_id("terminal", report.request_id),
                claim_id=report.claim_id,
                status=report.status or 200,
                size=report.size,
                routed_model=report.routed_model or entry.model,
                attempt=entry.attempt,
                **common,
            )
        elif report.result == "failed":
            event = RequestFailed(
                event_id=ids.event_id("terminal", report.request_id),
                claim_id=report.claim_id,
                error_type=report.error_type or "NetworkError",
                status=report.status,
                size=report.size,
                attempt=entry.attempt,
                **common,
            )
        elif report.result == "retry" and report.not_before is not None:
            event = RequestRetryScheduled(
                event_id=ids.event_id("retry", report.claim_id),
                claim_id=report.claim_id,
                attempt=entry.attempt + 1,
                not_before=report.not_before,
                **common,
            )
        else:
            event = RequestCanceled(event_id=ids.event_id("terminal", report.request_id), **common)
        self._transition(report.request_id, entry, event, out)

    def _transition(
        self, request_id: str, entry: Entry, event: RequestEvent, out: list[Out]
    ) -> None:
        state = next_state(entry.state, event)
        if state is None:
            return
        was = entry.state
        entry.state = state
        if isinstance(event, RequestRetryScheduled):
            entry.attempt, entry.not_before = event.attempt, event.not_before
            entry.claim_id = None
        self._put(request_id, entry)
        self._account(entry, was)
        if state == "pending":
            self._push(request_id, entry)
        out.append(Out("requests", entry.model, event))

    def _on_cancel_batch(self, message: CancelBatchRequests, now: datetime, out: list[Out]) -> None:
        self.cancelled[message.batch_id] = b"1"
        # Unsent rows end canceled now; rows in flight finish and their genuine result stands.
        index = self._index(message.model)
        for _, batch_id, _, request_id in index.heap:
            if batch_id != message.batch_id:
                continue
            entry = self._get(request_id)
            if entry is not None and entry.state == "pending":
                self._cancel(request_id, entry, now, out)

    def _cancel(self, request_id: str, entry: Entry, now: datetime, out: list[Out]) -> None:
        entry.state = "canceled"
        self._put(request_id, entry)
        out.append(
            Out(
                "requests",
                entry.model,
                RequestCanceled(
                    event_id=ids.event_id("terminal", request_id),
                    occurred_at=now,
                    request_id=request_id,
                    batch_id=entry.batch_id,
                    model=entry.model,
                ),
            )
        )

    # -- claiming -------------------------------------------------------------------------

    def _claim(self, model: str, now: datetime, out: list[Out]) -> None:
        index = self.models.get(model)
        if index is None:
            return
        capacity = self.limits.get(model, 0) - index.in_flight
        deferred: list[tuple[float, str, int, str]] = []
        while capacity > 0 and index.heap:
            item = heapq.heappop(index.heap)
            request_id = item[3]
            entry = self._get(request_id)
            if entry is None or entry.state != "pending":
                continue  # stale heap item: the request moved on
            if entry.batch_id is not None and entry.batch_id in self.cancelled:
                self._cancel(request_id, entry, now, out)
                continue
            if entry.not_before is not None and entry.not_before > now:
                deferred.append(item)
                continue
            self._claim_one(request_id, entry, now, out)
            capacity -= 1
        for item in deferred:
            heapq.heappush(index.heap, item)

    def _claim_one(self, request_id: str, entry: Entry, now: datetime, out: list[Out]) -> None:
        entry.claims += 1
        claim_id = ids.derived("claim", request_id, entry.claims)
        claimed = RequestClaimed(
            event_id=ids.event_id("claimed", claim_id),
            occurred_at=now,
            request_id=request_id,
            batch_id=entry.batch_id,
            model=entry.model,
            claim_id=claim_id,
            worker_id=self.worker_id,
            attempt=entry.attempt,
        )
        entry.claim_id = claim_id
        self._transition(request_id, entry, claimed, out)
        assert entry.deadline is not None
        out.append(
            Out(
                "dispatch",
                request_id,
                Dispatch(
                    event_id=ids.event_id("dispatch", claim_id),
                    occurred_at=now,
                    request_id=request_id,
                    batch_id=entry.batch_id,
                    template_id=entry.template_id,
                    custom_id=entry.custom_id,
                    model=entry.model,
                    claim_id=claim_id,
                    attempt=entry.attempt,
                    deadline=entry.deadline,
                ),
            )
        )

    def in_flight(self, model: str) -> int:
        index = self.models.get(model)
        return 0 if index is None else index.in_flight
