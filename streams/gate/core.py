"""The claim gate's decisions, free of I/O.

:class:`Gate` folds everything a gate partition hears — population, executor reports and
heartbeats, model-filter changes, batch control and ticks — and answers with the events to
publish. Its state is a mutable mapping of small records (a changelog-backed Faust table in
production, a dict in tests) that holds **live work only**:

- ``B:<batch>:<model>`` — a batch's rows of one model: the batch's facts, its file's chunk
  refs and the line ranges never claimed yet. A pending row that was never claimed has no
  record of its own, so a backlog of any size costs a few bytes per batch.
- ``R:<request>`` — a row with history: claimed, processing, or back to pending after a retry
  or a reclaim; and every live batchless (flex) row, with its own facts and body ref. It is
  deleted when the row ends.
- ``W:<partition>:<source partition>`` — the last population applied from each commands
  partition (a command handled twice after a crash does not populate twice).
- ``K:<owner>\\x1f<class>\\x1f<model>`` — leaky-bucket tokens; ``M:<model>`` — model liveness.

A batch's record goes once its last row ends, so after a run the table holds nothing for it.
The in-memory indexes (claimable rows per batch, delayed retries, in-flight sets, per-owner
counts) are derived and rebuilt by :meth:`Gate.rebuild` after a rebalance.

What to claim is :func:`streams.gate.scoring.select` (``select_live`` for a live model, over
its batches and flex rows kept in deadline order); every transition goes through
:func:`streams.lifecycle.next_state`, the state machine the projector applies too.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from datetime import datetime, timedelta
from typing import Any, Literal

import msgspec

from schemas import bodies, ids, topics
from schemas.bodies import BodyRef
from schemas.events import (
    AbortDispatch,
    BatchFacts,
    BatchlessFacts,
    CancelBatchRequests,
    ChainAborted,
    ChunkRef,
    DispatchBatch,
    DispatchItem,
    ExecutionReport,
    FinishedItem,
    GateInput,
    GateTick,
    LineRange,
    ModelFilterAppended,
    PendingItem,
    PendingRequests,
    RequestCanceled,
    RequestClaimed,
    RequestCompleted,
    RequestControl,
    RequestCreated,
    RequestErased,
    RequestEvent,
    RequestFailed,
    RequestReclaimed,
    RequestRetried,
    RequestRetryScheduled,
    RequestsPending,
    RequestStarted,
    RequestSubmitted,
    RequestTransitions,
    RetryRows,
    SourceMark,
    StartedItem,
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
from streams.lifecycle import IN_FLIGHT, State, next_state
from streams.responses.steps import RESPONSES_PATH

Abort = Literal["cancel", "expire"]
#: Rows per published lifecycle record (a population event counts each of its rows): keeps
#: records far below the message size limit.
EVENTS_PER_RECORD = 1000
#: Consecutive lines of a batch that share a dispatch partition: a decision's claims travel in
#: few records, and a large batch is spread over the partitions so that executors share it.
DISPATCH_CHUNK = 16


class GateRequest(msgspec.Struct, array_like=True):
    """A row with history, or a batchless row (``R:<request>``)."""

    model: str
    state: State
    batch_id: str  # "" for a batchless row
    line: int
    attempt: int = 0
    claims: int = 0
    claim_id: str | None = None
    claimed_at: datetime | None = None
    started_at: datetime | None = None
    worker_id: str | None = None
    not_before: datetime | None = None
    abort: Abort | None = None  # the batch was cancelled or expired while this was in flight
    partition: int = 0  # dispatch partition of the current claim
    # A batchless row's own facts and body (a batch row finds both in its batch's record).
    facts: BatchlessFacts | None = None
    body: BodyRef | None = None
    # Claims restart after an explicit retry; the version keeps their ids new (ids.claim_id).
    version: int = 0
    lane: int = -1  # the lane of the current claim, with prefetch (DispatchItem.lane)
    # Its batch was retried while an abort was on the way: if the abort stops the call, the
    # row ends canceled and runs again (cancel then retry is pause and resume).
    rerun: bool = False


class GateBatch(msgspec.Struct):
    """A batch's rows of one model (``B:<batch>:<model>``)."""

    facts: BatchFacts
    model: str
    chunks: list[ChunkRef]
    unclaimed: list[LineRange]  # lines never claimed, in line order
    closed: Abort | None = None  # cancelled or expired: nothing more is claimed

    def body_ref(self, line: int) -> Any:
        for chunk in self.chunks:
            if chunk.first_line <= line < chunk.first_line + chunk.count:
                return chunk.body(line)
        raise KeyError(f"line {line} is in no chunk of batch {self.facts.batch_id}")


class Liveness(msgspec.Struct, frozen=True):
    """When a claim is taken back (core §4.8) and how many attempts a request gets."""

    claim_timeout: timedelta = timedelta(seconds=60)
    processing_timeout: timedelta = timedelta(seconds=600)
    stale_worker: timedelta = timedelta(seconds=30)
    max_retries: int | None = 1000


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(GateRequest)
_batch_decoder = msgspec.msgpack.Decoder(GateBatch)
_mark_decoder = msgspec.msgpack.Decoder(tuple[int, int])


class _Batch:
    """A live batch's rows of one model, as the claim cycle sees them."""

    __slots__ = ("key", "entry", "returned", "live", "in_flight", "unclaimed_lines")

    def __init__(self, key: str, entry: GateBatch) -> None:
        self.key = key
        self.entry = entry
        self.returned: list[int] = []  # heap of lines back to pending and claimable now
        self.live = 0  # rows with an ``R:`` record
        self.in_flight: set[str] = set()  # its rows in flight: a cancel visits these alone
        # Lines in ``entry.unclaimed``, kept as they are taken: every claim cycle reads it, and
        # a file that interleaves models leaves each model's batch hundreds of one-line ranges.
        self.unclaimed_lines = _count(entry.unclaimed)

    def set_unclaimed(self, ranges: list[LineRange]) -> None:
        self.entry.unclaimed = ranges
        self.unclaimed_lines = _count(ranges)


def _count(ranges: list[LineRange]) -> int:
    return sum(r.end - r.start for r in ranges)


#: What ranks rows alike but for their deadlines: (owner, window-class, W). A not-live model
#: claims a row in full once it is within ramp(W) of its deadline (spec §3.2), so among rows of
#: one kind in deadline order those within their ramp come first.
Kind = tuple[str, str, float]


class _Ranked:
    """(deadline, id) pairs in order by kind, and each kind's first pair in order: a claim
    cycle reads the best of each owner with rows in flight and of all the others together
    (scoring.select_live), without walking the pairs of the busy ones; a not-live model's
    cycle reads each kind's pairs within their ramp and the first past it
    (scoring.select_paced)."""

    def __init__(self) -> None:
        self.by_kind: dict[Kind, list[tuple[datetime, str]]] = {}
        self.kinds: dict[str, dict[Kind, None]] = {}  # each owner's kinds
        self.heads: list[tuple[datetime, str, Kind]] = []  # (deadline, id, kind), one a kind

    def add(self, kind: Kind, deadline: datetime, id_: str) -> None:
        mine = self.by_kind.get(kind)
        if mine is None:
            mine = self.by_kind[kind] = []
            self.kinds.setdefault(kind[0], {})[kind] = None
        if not mine or (deadline, id_) < mine[0]:
            if mine:
                self._unhead(kind, mine[0])
            bisect.insort(self.heads, (deadline, id_, kind))
        bisect.insort(mine, (deadline, id_))

    def drop(self, kind: Kind, deadline: datetime, id_: str) -> None:
        mine, pair = self.by_kind.get(kind, []), (deadline, id_)
        at = bisect.bisect_left(mine, pair)
        if at == len(mine) or mine[at] != pair:
            return
        del mine[at]
        if at == 0:
            self._unhead(kind, pair)
            if mine:
                bisect.insort(self.heads, (*mine[0], kind))
                return
            del self.by_kind[kind]
            owned = self.kinds[kind[0]]
            del owned[kind]
            if not owned:
                del self.kinds[kind[0]]

    def _unhead(self, kind: Kind, pair: tuple[datetime, str]) -> None:
        head = (*pair, kind)
        at = bisect.bisect_left(self.heads, head)
        if at < len(self.heads) and self.heads[at] == head:
            del self.heads[at]

    def owned(self, owner: str) -> Iterable[tuple[datetime, str]]:
        """The pairs of ``owner``, in order."""
        kinds = self.kinds.get(owner, {})
        if len(kinds) == 1:  # the usual case: one list, no merge
            return self.by_kind[next(iter(kinds))]
        return heapq.merge(*(self.by_kind[kind] for kind in kinds))

    def others(self, busy: Mapping[str, int]) -> Iterator[tuple[datetime, str]]:
        """The pairs of the owners without a count in ``busy``, in order: their lists merged,
        each kind's entering the merge only once its first pair comes up, so a busy owner
        costs one skip a kind however many pairs it holds."""
        heads, i = self.heads, 0
        merging: list[tuple[datetime, str, Kind, int]] = []  # (deadline, id, kind, at)
        while True:
            while i < len(heads) and busy.get(heads[i][2][0]):
                i += 1
            if i < len(heads) and (not merging or heads[i] < merging[0][:3]):
                heapq.heappush(merging, (*heads[i], 0))
                i += 1
                continue
            if not merging:
                return
            deadline, id_, kind, at = heapq.heappop(merging)
            yield deadline, id_
            mine = self.by_kind[kind]
            if at + 1 < len(mine):
                heapq.heappush(merging, (*mine[at + 1], kind, at + 1))


class _Buckets:
    """The leaky-bucket tokens (a mirror of the ``K:`` records): per model, the (owner,
    window-class) pairs whose next token is still to come, and when each comes back, so that a
    cycle neither walks every bucket nor keeps the spent ones."""

    def __init__(self) -> None:
        self.cooling: dict[str, dict[tuple[str, str], datetime]] = {}
        self._due: list[tuple[datetime, str]] = []  # (next token at, key), stale pairs left in

    def set(self, key: str, at: datetime) -> None:
        owner, window_class, model = _bucket_parts(key)
        self.cooling.setdefault(model, {})[(owner, window_class)] = at
        heapq.heappush(self._due, (at, key))

    def expire(self, now: datetime) -> list[str]:
        """Let go of every token due by ``now``; returns their keys."""
        gone = []
        while self._due and self._due[0][0] <= now:
            at, key = heapq.heappop(self._due)
            owner, window_class, model = _bucket_parts(key)
            pairs = self.cooling.get(model, {})
            if pairs.get((owner, window_class)) == at:  # not stamped again since
                del pairs[(owner, window_class)]
                if not pairs:
                    del self.cooling[model]
                gone.append(key)
        return gone


class _Model:
    def __init__(self) -> None:
        self.batches: dict[str, _Batch] = {}
        self.ranked = _Ranked()  # the batches
        # (deadline, batch id) of every batch, stale pairs left in: expiry pops the due ones.
        self.deadlines: list[tuple[datetime, str]] = []
        # Batchless rows claimable now: request id -> (deadline, kind), and ranked.
        self.loose: dict[str, tuple[datetime, Kind]] = {}
        self.loose_ranked = _Ranked()
        self.delayed: list[tuple[float, str]] = []  # (not_before, request id)
        self.in_flight: set[str] = set()
        self.lanes: list[int] = []  # claims in flight in each lane used yet, with prefetch
        # (claims, lane) of every used lane, stale pairs left in: picking a lane is then
        # logarithmic in the model's limit, which may be set huge for an unlimited upstream.
        self._counts: list[tuple[int, int]] = []

    def add(self, batch: _Batch) -> None:
        facts = batch.entry.facts
        self.batches[facts.batch_id] = batch
        self.ranked.add(_batch_kind(facts), facts.deadline, facts.batch_id)
        heapq.heappush(self.deadlines, (facts.deadline, facts.batch_id))

    def drop(self, batch: _Batch) -> None:
        facts = batch.entry.facts
        self.batches.pop(facts.batch_id, None)
        self.ranked.drop(_batch_kind(facts), facts.deadline, facts.batch_id)
        if len(self.deadlines) > 2 * len(self.batches) + 64:
            # Pairs of batches gone would otherwise stay until their deadlines pass.
            self.deadlines = [(b.entry.facts.deadline, i) for i, b in self.batches.items()]
            heapq.heapify(self.deadlines)

    def refacts(self, batch: _Batch, facts: BatchFacts) -> None:
        """A retry renews the batch's facts (its deadline among them): rank it anew."""
        self.drop(batch)
        batch.entry.facts = facts
        self.add(batch)

    def add_loose(self, request_id: str, deadline: datetime, kind: Kind) -> None:
        if request_id not in self.loose:
            self.loose[request_id] = (deadline, kind)
            self.loose_ranked.add(kind, deadline, request_id)

    def drop_loose(self, request_id: str) -> None:
        held = self.loose.pop(request_id, None)
        if held is not None:
            self.loose_ranked.drop(held[1], held[0], request_id)

    def pick_lane(self, limit: int) -> int:
        """The lane with the fewest claims in it (the lowest of equals): an empty lane
        starts its claim at once, a busy one queues it behind the fewest calls."""
        counts, lanes = self._counts, self.lanes
        while counts and not (counts[0][1] < limit and lanes[counts[0][1]] == counts[0][0]):
            heapq.heappop(counts)  # stale, or a lane past a lowered limit
        if len(lanes) < limit and (not counts or counts[0][0] > 0):
            return len(lanes)  # the first lane never used: empty, and below any busy one
        return counts[0][1]

    def join(self, request_id: str, entry: GateRequest) -> None:
        """The row is in flight, in its lane if it has one."""
        self.in_flight.add(request_id)
        if batch := self.batches.get(entry.batch_id):
            batch.in_flight.add(request_id)
        if entry.lane >= 0:
            while len(self.lanes) <= entry.lane:
                self._count(len(self.lanes), 0, grow=True)
            self._count(entry.lane, self.lanes[entry.lane] + 1)

    def leave(self, request_id: str, entry: GateRequest) -> None:
        """The row is no longer in flight: its lane has room again."""
        self.in_flight.discard(request_id)
        if batch := self.batches.get(entry.batch_id):
            batch.in_flight.discard(request_id)
        if 0 <= entry.lane < len(self.lanes):
            self._count(entry.lane, self.lanes[entry.lane] - 1)
        entry.lane = -1

    def _count(self, lane: int, claims: int, *, grow: bool = False) -> None:
        if grow:
            self.lanes.append(claims)
        else:
            self.lanes[lane] = claims
        heapq.heappush(self._counts, (claims, lane))
        if len(self._counts) > 2 * len(self.lanes) + 64:
            # Pairs of counts no lane holds any longer may never surface to be dropped.
            self._counts = [(n, i) for i, n in enumerate(self.lanes)]
            heapq.heapify(self._counts)


class Gate:
    def __init__(
        self,
        state: MutableMapping[str, bytes],
        limits: Mapping[str, int],
        worker_id: str,
        *,
        partition: int = 0,
        config: scoring.GateConfig | None = None,
        liveness: Liveness | None = None,
        dispatch_partitions: int = topics.DISPATCH.partitions,
    ) -> None:
        self.state = state
        self.limits = limits
        self.worker_id = worker_id
        self.partition = partition  # the input partition being handled (watermark keys)
        self.config = config or scoring.GateConfig()
        self.liveness = liveness or Liveness()
        self.dispatch_partitions = dispatch_partitions
        self.models: dict[str, _Model] = {}
        self.owner_active: dict[str, int] = {}
        # Executor liveness is soft state, rebuilt from heartbeats within one interval.
        self.worker_seen: dict[str, datetime] = {}
        self.workers_dead: set[str] = set()
        self.started_at: datetime | None = None
        # Worker staleness is judged on the time of the newest heartbeat or tick handled, not
        # the wall clock: a gate catching up on a backlog must not take a worker for dead
        # because that worker's newer heartbeats are still queued behind the backlog.
        self.clock: datetime | None = None
        self.buckets = _Buckets()
        self.asked: dict[str, datetime] = {}  # quiet calls dispatched again (_ask_again), when
        # When each in-flight row's holder last said it still runs it (in memory: the record
        # is rewritten only every half claim timeout, see _start).
        self.heard: dict[str, datetime] = {}
        self._events: dict[str, list[RequestEvent]] = {}
        self._dispatch: dict[int, list[DispatchItem]] = {}
        self._headers: dict[int, dict[str, dict[str, str]]] = {}
        self._out: list[Out] = []

    # -- state access ---------------------------------------------------------------------

    def _request(self, request_id: str) -> GateRequest | None:
        raw = self.state.get(f"R:{request_id}")
        return None if raw is None else _request_decoder.decode(raw)

    def _put_request(self, request_id: str, entry: GateRequest) -> None:
        self.state[f"R:{request_id}"] = _encoder.encode(entry)

    def _put_batch(self, batch: _Batch) -> None:
        self.state[batch.key] = _encoder.encode(batch.entry)

    def _model(self, model: str) -> _Model:
        index = self.models.get(model)
        if index is None:
            index = self.models[model] = _Model()
        return index

    def in_flight(self, model: str) -> int:
        index = self.models.get(model)
        return 0 if index is None else len(index.in_flight)

    def backlog(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(model, window) -> (pending, in flight) of the rows held here, read-only (for
        metrics). A batch row counts under its batch's completion window, a batchless row
        under its service tier (``batchless`` without one)."""
        counts: dict[tuple[str, str], list[int]] = {}

        def add(model: str, window: str, at: int, n: int = 1) -> None:
            counts.setdefault((model, window), [0, 0])[at] += n

        for model, index in self.models.items():
            for batch in index.batches.values():
                facts = batch.entry.facts
                add(model, facts.window_class, 0, batch.unclaimed_lines + len(set(batch.returned)))
            waiting = {*index.loose, *(request_id for _, request_id in index.delayed)}
            for at, request_ids in ((0, waiting), (1, index.in_flight)):
                for request_id in request_ids:
                    entry = self._request(request_id)
                    if entry is None or (at == 0 and entry.state != "pending"):
                        continue  # ended since it was queued
                    batch_ = index.batches.get(entry.batch_id)
                    if batch_ is not None:
                        add(model, batch_.entry.facts.window_class, at)
                    elif entry.facts is not None:
                        add(model, entry.facts.service_tier or "batchless", at)
        return {key: (pending, in_flight) for key, (pending, in_flight) in counts.items()}

    def rebuild(self) -> None:
        """Derive every index from the state records (after a rebalance)."""
        self.models, self.owner_active, self.buckets = {}, {}, _Buckets()
        self.asked, self.heard = {}, {}
        items = list(self.state.items())
        for key, raw in items:
            if key.startswith("K:"):
                self.buckets.set(key, datetime.fromisoformat(raw.decode()))
            elif key.startswith("B:"):
                batch_entry = _batch_decoder.decode(raw)
                self._model(batch_entry.model).add(_Batch(key, batch_entry))
        for key, raw in items:
            if key.startswith("R:"):
                request_id, entry = key[2:], _request_decoder.decode(raw)
                batch = self._model(entry.model).batches.get(entry.batch_id)
                if entry.batch_id and batch is None:
                    del self.state[key]  # cannot happen: a batch outlives its rows; heal anyway
                    continue
                if batch is not None:
                    batch.live += 1
                if entry.state in IN_FLIGHT:
                    self._model(entry.model).join(request_id, entry)
                    self._owner(self._owner_of(entry), +1)
                else:
                    self._queue(request_id, entry)

    def _owner_of(self, entry: GateRequest) -> str:
        if entry.facts is not None:
            return entry.facts.owner
        return self._model(entry.model).batches[entry.batch_id].entry.facts.owner

    def _queue(self, request_id: str, entry: GateRequest) -> None:
        index = self._model(entry.model)
        if entry.not_before is not None:
            heapq.heappush(index.delayed, (entry.not_before.timestamp(), request_id))
        elif not entry.batch_id:
            if entry.facts is not None:  # a batchless row carries its facts
                index.add_loose(request_id, entry.facts.deadline, self._row_kind(entry.facts))
        else:
            heapq.heappush(index.batches[entry.batch_id].returned, entry.line)

    def _owner(self, owner: str, delta: int) -> None:
        left = self.owner_active.get(owner, 0) + delta
        if left > 0:
            self.owner_active[owner] = left
        else:
            self.owner_active.pop(owner, None)

    # -- input ----------------------------------------------------------------------------

    def handle(self, message: GateInput, now: datetime) -> list[Out]:
        """Fold one input; returns what to publish, in order."""
        try:
            return self._handle(message, now)
        except BaseException:
            self._events, self._dispatch, self._headers, self._out = {}, {}, {}, []
            raise

    def _handle(self, message: GateInput, now: datetime) -> list[Out]:
        if self.started_at is None:
            self.started_at = now
        model: str | None = None
        match message:
            case PendingRequests():
                if self._fresh(message.source):
                    self._on_pending(message, now)
                model = message.model
            case RequestSubmitted():
                if self._fresh(message.source):
                    self._on_submitted(message, now)
                model = message.model
            case RetryRows():
                if self._fresh(message.source):
                    self._on_retry_rows(message, now)
                model = message.model
            case RequestControl():
                if self._fresh(message.source):
                    self._on_control(message, now)
                model = message.model
            case ExecutionReport():
                self._seen(message.worker_id, message.occurred_at)
                self._on_report(message, now)
                model = message.model
            case CancelBatchRequests():
                if message.source is None or self._fresh(message.source):
                    self._close(message.model, message.batch_id, "cancel", now)
                model = message.model
            case ModelFilterAppended():
                self.state[f"M:{message.model}"] = message.state.encode()
                model = message.model
            case WorkerHeartbeat():
                self._seen(message.worker_id, message.occurred_at)
                self._observe(message.occurred_at)
            case WorkerStopped():
                self.workers_dead.add(message.worker_id)
            case GateTick():
                model = message.model
                self._observe(message.occurred_at)
                self._reclaim_stale(model, now)
        if model is not None:
            self._claim(model, now)
        return self._flush(now)

    def _seen(self, worker_id: str, at: datetime) -> None:
        # The newest word wins: a partition taken over brings its backlog's older heartbeats,
        # which must not make a worker heard from since look stale on every partition here.
        seen = self.worker_seen.get(worker_id)
        if seen is None or at > seen:
            self.worker_seen[worker_id] = at

    def _observe(self, at: datetime) -> None:
        if self.clock is None or at > self.clock:
            self.clock = at

    def _flush(self, now: datetime) -> list[Out]:
        out = self._out
        for model, events in self._events.items():
            for chunk in _records(events):
                record = RequestTransitions(
                    event_id=ids.event_id("transitions", chunk[0].event_id, len(chunk)),
                    occurred_at=now,
                    model=model,
                    events=chunk,
                )
                out.append(Out("requests", model, record))
        for partition, items in self._dispatch.items():
            record_ = DispatchBatch(
                event_id=ids.event_id("dispatch", items[0].claim_id, len(items)),
                occurred_at=now,
                items=items,
                batch_headers=self._headers.get(partition, {}),
            )
            out.append(Out("dispatch", items[0].request_id, record_, partition=partition))
        self._events, self._dispatch, self._headers, self._out = {}, {}, {}, []
        return out

    def _emit(self, event: RequestEvent) -> None:
        self._events.setdefault(event.model, []).append(event)

    # -- population -----------------------------------------------------------------------

    def _fresh(self, source: SourceMark) -> bool:
        """Whether this input from the commands agent is new: marks from one commands
        partition only grow, so a command handled twice after a crash applies once."""
        key = f"W:{self.partition}:{source.partition}"
        raw = self.state.get(key)
        mark = (source.offset, source.seq)
        if raw is not None and tuple(_mark_decoder.decode(raw)) >= mark:
            return False
        self.state[key] = _encoder.encode(mark)
        return True

    def _on_pending(self, message: PendingRequests, now: datetime) -> None:
        facts, model = message.batch, message.model
        key = f"B:{facts.batch_id}:{model}"
        lines = [line for r in message.ranges for line in range(r.start, r.end)]
        if key in self.state or not lines:
            return  # populated already (a population re-sent by hand past its mark)
        for start in range(0, len(lines), EVENTS_PER_RECORD):
            part = lines[start : start + EVENTS_PER_RECORD]
            self._emit(
                RequestsPending(
                    event_id=ids.event_id("pending", facts.batch_id, model, part[0]),
                    occurred_at=now,
                    batch_id=facts.batch_id,
                    file_id=facts.file_id,
                    model=model,
                    owner=facts.owner,
                    created_at=now,
                    deadline=facts.deadline,
                    window_class=facts.window_class,
                    service_tier=facts.service_tier,
                    items=[PendingItem(ids.request_id(facts.batch_id, n), n) for n in part],
                    window_s=facts.window_s,
                )
            )
        if model not in self.limits:
            reason = RequestBuilderError(error=f"model '{model}' is not configured")
            for n in lines:
                self._end_unclaimed(facts, model, n, reason, now)
            return
        entry = GateBatch(facts, model, message.chunks, list(message.ranges))
        batch = _Batch(key, entry)
        self._model(model).add(batch)
        self._put_batch(batch)

    def _on_retry_rows(self, message: RetryRows, now: datetime) -> None:
        """A batch's ended rows run again (core §2.3 retry): each one that is not live here
        goes back to pending under the batch's new retry version; the batch reopens."""
        facts, model = message.batch, message.model
        index = self._model(model)
        batch = index.batches.get(facts.batch_id)
        unclaimed = set() if batch is None else _lines(batch.entry.unclaimed)
        again: list[int] = []
        ended: tuple[tuple[State, list[LineRange]], ...] = (
            ("failed", message.failed),
            ("canceled", message.canceled),
        )
        for from_state, ranges in ended:
            for line in _lines(ranges):
                request_id = ids.request_id(facts.batch_id, line)
                if f"R:{request_id}" in self.state or line in unclaimed:
                    continue  # live: it has not ended, there is nothing to run again
                self._emit(RequestRetried(
                    event_id=ids.event_id("retried", request_id, facts.retry_version),
                    occurred_at=now, request_id=request_id, batch_id=facts.batch_id,
                    model=model, from_state=from_state, retry_version=facts.retry_version,
                ))  # fmt: skip
                again.append(line)
        if not again and batch is None:
            return
        if batch is None:
            batch = _Batch(
                f"B:{facts.batch_id}:{model}", GateBatch(facts, model, message.chunks, [])
            )
            index.add(batch)
        else:
            index.refacts(batch, facts)
        batch.entry.closed = None
        batch.set_unclaimed(_ranges(sorted(unclaimed | set(again))))
        for request_id in self._rows_of(index, batch) if message.scope == "batch" else ():
            row = self._request(request_id)
            if row is not None and row.batch_id == facts.batch_id and row.abort is not None:
                # In flight when the batch was cancelled or expired, so the read model did not
                # list it as ended: a result it still returns counts, an aborted call reruns.
                row.abort, row.rerun = None, True
                self._put_request(request_id, row)
        if model not in self.limits:
            reason = RequestBuilderError(error=f"model '{model}' is not configured")
            for line in again:
                self._end_unclaimed(facts, model, line, reason, now)
            batch.set_unclaimed(_ranges(sorted(unclaimed)))
        self._put_batch(batch)
        self._retire(index, batch)

    def _on_control(self, message: RequestControl, now: datetime) -> None:
        """A batchless request's owner cancels, retries or erases it (core §2.4)."""
        request_id, model = message.request_id, message.model
        entry = self._request(request_id)
        if entry is not None and entry.batch_id:
            return  # batch rows are controlled through their batch
        if message.action == "cancel" and entry is not None and entry.abort is None:
            entry.abort = "cancel"
            if entry.state == "pending":
                self._abort_end(request_id, entry, now)
            else:  # in flight: abort the call; its report ends the row
                self._put_request(request_id, entry)
                self._stop(request_id, entry, now)
        elif message.action == "retry" and entry is None and message.facts and message.body:
            self._emit(RequestRetried(
                event_id=ids.event_id("retried", request_id, message.source.offset),
                occurred_at=now, request_id=request_id, batch_id=None, model=model,
                from_state="failed", retry_version=message.source.offset + 1,
            ))  # fmt: skip
            retried = GateRequest(
                model=model, state="pending", batch_id="", line=0, facts=message.facts,
                body=message.body, version=message.source.offset + 1,
            )  # fmt: skip
            self._put_request(request_id, retried)
            self._queue(request_id, retried)
        elif message.action == "erase":
            if entry is not None:
                self._forget(request_id, entry, now)
            self._emit(RequestErased(
                event_id=ids.event_id("erased", request_id), occurred_at=now,
                request_id=request_id, batch_id=None, model=model,
            ))  # fmt: skip

    def _forget(self, request_id: str, entry: GateRequest, now: datetime) -> None:
        """Drop a live batchless row at once (erasure), aborting its call if one runs."""
        index = self._model(entry.model)
        if entry.state in IN_FLIGHT:
            index.leave(request_id, entry)
            self._owner(self._owner_of(entry), -1)
            self._stop(request_id, entry, now, erased=True)
            self._forget_words(request_id)
        index.drop_loose(request_id)
        self.state.pop(f"R:{request_id}", None)

    def _on_submitted(self, message: RequestSubmitted, now: datetime) -> None:
        """A flex request: a live batchless row of its own."""
        request_id, model = message.request_id, message.model
        if f"R:{request_id}" in self.state:
            return
        self._emit(RequestCreated(
            event_id=ids.event_id("created", request_id), occurred_at=now, request_id=request_id,
            model=model, state="pending", facts=message.facts,
        ))  # fmt: skip
        if model not in self.limits:
            reason = RequestBuilderError(error=f"model '{model}' is not configured")
            envelope = reason.to_json()
            self._emit(RequestFailed(
                event_id=ids.event_id("terminal", request_id), occurred_at=now,
                request_id=request_id, batch_id=None, model=model, from_state="pending",
                claim_id=None, error_type=type(reason).__name__, status=None,
                size=len(envelope.encode()), attempt=0, error=envelope,
            ))  # fmt: skip
            return
        entry = GateRequest(
            model=model, state="pending", batch_id="", line=0, facts=message.facts,
            body=message.body,
        )  # fmt: skip
        self._put_request(request_id, entry)
        self._queue(request_id, entry)

    # -- executor reports -----------------------------------------------------------------

    def _current(self, request_id: str, claim_id: str) -> GateRequest | None:
        """The row if ``claim_id`` is its current claim and it is in flight (fencing)."""
        entry = self._request(request_id)
        if entry is None or entry.claim_id != claim_id or entry.state not in IN_FLIGHT:
            return None
        return entry

    def _on_report(self, report: ExecutionReport, now: datetime) -> None:
        for started in report.started:
            entry = self._current(started.request_id, started.claim_id)
            if entry is not None:
                self._start(started, entry, report.worker_id, now)
        for finished in report.finished:
            entry = self._current(finished.request_id, finished.claim_id)
            if entry is None:
                continue  # fenced out: a stale claim, or the request already ended
            if finished.result == "not_sent":
                if entry.state == "claimed":
                    self._not_sent(finished.request_id, entry, now)
                # else an executor re-read a dispatch that another one runs (it started it):
                # that run reports it
                continue
            if entry.state == "claimed":
                started = StartedItem(finished.request_id, finished.claim_id)
                self._start(started, entry, report.worker_id, now)
            self._finish(finished, entry, now)

    def _start(self, item: StartedItem, entry: GateRequest, worker: str, now: datetime) -> None:
        if entry.state != "claimed":
            # Said again: another worker took the claim over after a rebalance, or a chain
            # worker, which says every claim it holds with each heartbeat, still runs it. The
            # processing timeout counts from then: a long chain is judged by its holder's life.
            # The same holder's word is kept in memory and written to the record only once the
            # stored one is half a claim timeout old (or half a processing timeout, if shorter):
            # each held chain head rewrote its record (a changelog record) every heartbeat. A
            # gate rebuilt meanwhile counts from the record, which is then too recent for the
            # quiet check to ask the call again or the processing timeout to take it back.
            self.heard[item.request_id] = now
            renew = min(self.liveness.claim_timeout, self.liveness.processing_timeout) / 2
            if worker != entry.worker_id or not entry.started_at or now - entry.started_at > renew:
                entry.worker_id, entry.started_at = worker, now
                self._put_request(item.request_id, entry)
            return
        entry.worker_id, entry.started_at = worker, now
        assert entry.claim_id is not None
        self._transition(item.request_id, entry, RequestStarted(
            event_id=ids.event_id("started", entry.claim_id), occurred_at=now,
            request_id=item.request_id, batch_id=entry.batch_id or None, model=entry.model,
            from_state=entry.state, claim_id=entry.claim_id, worker_id=worker,
        ))  # fmt: skip

    def _not_sent(self, request_id: str, entry: GateRequest, now: datetime) -> None:
        """An executor handed a claim back unsent (a dispatch it judged stale)."""
        if entry.abort is not None:
            self._abort_end(request_id, entry, now)
            return
        assert entry.claim_id is not None
        self._transition(request_id, entry, RequestReclaimed(
            event_id=ids.event_id("reclaimed", entry.claim_id), occurred_at=now,
            request_id=request_id, batch_id=entry.batch_id or None, model=entry.model,
            from_state=entry.state, claim_id=entry.claim_id, attempt=entry.attempt,
            reason="not_sent",
        ))  # fmt: skip

    def _finish(self, item: FinishedItem, entry: GateRequest, now: datetime) -> None:
        request_id = item.request_id
        genuine = item.result in ("completed", "failed")
        # Expiry ends in-flight work BatchTerminated whatever it returns, so an expired
        # batch's files stop changing; after a cancel a genuine result still counts.
        if entry.abort == "expire" or (entry.abort == "cancel" and not genuine):
            self._abort_end(request_id, entry, now)
            return
        common = self._common(request_id, entry, now, "terminal", *_run(entry.version))
        if item.result == "completed":
            self._transition(request_id, entry, RequestCompleted(
                claim_id=entry.claim_id, status=item.status or 200, size=item.size,
                routed_model=item.routed_model or entry.model, attempt=entry.attempt, **common,
            ))  # fmt: skip
        elif item.result == "failed":
            self._transition(request_id, entry, RequestFailed(
                claim_id=entry.claim_id, error_type=item.error_type or "NetworkError",
                status=item.status, size=item.size, attempt=entry.attempt, **common,
            ))  # fmt: skip
        elif item.result == "retry" and item.not_before is not None:
            assert entry.claim_id is not None
            claim = entry.claim_id
            entry.attempt, entry.not_before = entry.attempt + 1, item.not_before
            self._transition(request_id, entry, RequestRetryScheduled(
                **self._common(request_id, entry, now, "retry", claim), claim_id=claim,
                attempt=entry.attempt, not_before=item.not_before,
            ))  # fmt: skip
        elif entry.rerun:  # the abort of a cancel that a retry has since undone
            self._rerun(request_id, entry, now)
        else:  # canceled unasked (the executor is stopping): it may have been sent
            self._take_back(request_id, entry, "worker_dead", now)

    def _rerun(self, request_id: str, entry: GateRequest, now: datetime) -> None:
        """End the row canceled, as its batch's cancel asked, and run it again under the
        retry that reopened the batch, as a retry of a canceled row does."""
        batch = self._model(entry.model).batches[entry.batch_id]  # its live row keeps it
        facts = batch.entry.facts
        # Unclaimed before the row ends, so that the batch is not retired in between.
        batch.set_unclaimed(_with_line(batch.entry.unclaimed, entry.line))
        self._transition(request_id, entry, RequestCanceled(
            **self._common(request_id, entry, now, "terminal", *_run(entry.version)),
        ))  # fmt: skip
        self._emit(RequestRetried(
            event_id=ids.event_id("retried", request_id, facts.retry_version),
            occurred_at=now, request_id=request_id, batch_id=facts.batch_id, model=entry.model,
            from_state="canceled", retry_version=facts.retry_version,
        ))  # fmt: skip
        self._put_batch(batch)

    def _common(
        self, request_id: str, entry: GateRequest, now: datetime, kind: str, *key: object
    ) -> dict[str, Any]:
        return {
            "event_id": ids.event_id(kind, request_id, *key),
            "occurred_at": now,
            "request_id": request_id,
            "batch_id": entry.batch_id or None,
            "model": entry.model,
            "from_state": entry.state,
        }

    # -- transitions ----------------------------------------------------------------------

    def _transition(self, request_id: str, entry: GateRequest, event: RequestEvent) -> None:
        """Apply ``event`` through the state machine and record it; keeps the in-flight set,
        owner counts, queues and the row's record in step."""
        state = next_state(entry.state, event)
        if state is None:
            raise AssertionError(f"{type(event).__name__} does not apply to {entry.state}")
        self._emit(event)
        was, entry.state = entry.state, state
        index = self._model(entry.model)
        owner = self._owner_of(entry)
        if was in IN_FLIGHT and state not in IN_FLIGHT:
            index.leave(request_id, entry)
            self._owner(owner, -1)
            self._forget_words(request_id)
        elif was not in IN_FLIGHT and state in IN_FLIGHT:
            index.join(request_id, entry)
            self._owner(owner, +1)
        if state in ("completed", "failed", "canceled"):
            self.state.pop(f"R:{request_id}", None)
            index.drop_loose(request_id)
            batch = index.batches.get(entry.batch_id)
            if batch is not None:
                batch.live -= 1
                self._retire(index, batch)
            return
        if state == "pending":
            entry.claim_id = entry.claimed_at = entry.started_at = entry.worker_id = None
            entry.rerun = False
            self._queue(request_id, entry)
        self._put_request(request_id, entry)

    def _retire(self, index: _Model, batch: _Batch) -> None:
        """Forget a batch once nothing of it is live here."""
        if batch.live <= 0 and not batch.entry.unclaimed:
            index.drop(batch)
            self.state.pop(batch.key, None)

    def _abort_end(self, request_id: str, entry: GateRequest, now: datetime) -> None:
        if entry.abort == "expire":
            self._fail(request_id, entry, BatchTerminated(), now)
        else:
            self._transition(request_id, entry, RequestCanceled(
                **self._common(request_id, entry, now, "terminal", *_run(entry.version)),
            ))  # fmt: skip

    def _fail(self, request_id: str, entry: GateRequest, reason: FailureReason, now: datetime) -> None:  # fmt: skip
        envelope = reason.to_json()
        self._transition(request_id, entry, RequestFailed(
            **self._common(request_id, entry, now, "terminal", *_run(entry.version)),
            claim_id=entry.claim_id,
            error_type=type(reason).__name__, status=None, size=len(envelope.encode()),
            attempt=entry.attempt, error=envelope,
        ))  # fmt: skip

    def _end_unclaimed(
        self,
        facts: BatchFacts,
        model: str,
        line: int,
        reason: FailureReason | None,
        now: datetime,
    ) -> None:
        """End a pending row that has no record of its own (never claimed): canceled when
        ``reason`` is None, else failed with it."""
        request_id = ids.request_id(facts.batch_id, line)
        common: dict[str, Any] = {
            "event_id": ids.event_id("terminal", request_id, *_run(facts.retry_version)),
            "occurred_at": now,
            "request_id": request_id,
            "batch_id": facts.batch_id,
            "model": model,
            "from_state": "pending",
        }
        if reason is None:
            self._emit(RequestCanceled(**common))
            return
        envelope = reason.to_json()
        self._emit(RequestFailed(
            **common, claim_id=None, error_type=type(reason).__name__, status=None,
            size=len(envelope.encode()), attempt=0, error=envelope,
        ))  # fmt: skip

    # -- cancel and expiry ----------------------------------------------------------------

    def _close(self, model: str, batch_id: str, why: Abort, now: datetime) -> None:
        """Cancel or expire a batch's rows of ``model``: rows not sent end at once (canceled,
        or failed ``BatchTerminated``); rows in flight are aborted and end on the executor's
        report (core §4.7)."""
        index = self.models.get(model)
        batch = None if index is None else index.batches.get(batch_id)
        if index is None or batch is None or batch.entry.closed is not None:
            return
        entry = batch.entry
        entry.closed = why
        reason = BatchTerminated() if why == "expire" else None
        for r in entry.unclaimed:
            for line in range(r.start, r.end):
                self._end_unclaimed(entry.facts, model, line, reason, now)
        rows = list(self._rows_of(index, batch))
        batch.set_unclaimed([])
        batch.returned = []
        self._put_batch(batch)
        for request_id in rows:
            row = self._request(request_id)
            if row is None or row.batch_id != batch_id:
                continue
            if row.state == "pending" and row.batch_id:
                row.abort = why
                self._abort_end(request_id, row, now)
            elif row.abort is None:
                row.abort = why
                self._put_request(request_id, row)
                self._stop(request_id, row, now, path=entry.facts.path)
        self._retire(index, batch)

    def _rows_of(self, index: _Model, batch: _Batch) -> Iterator[str]:
        """Request ids with a record that may belong to the batch."""
        batch_id = batch.entry.facts.batch_id
        yield from (ids.request_id(batch_id, line) for line in set(batch.returned))
        yield from (request_id for _, request_id in index.delayed)
        # A copy: ending a row takes it out of the set.
        yield from list(batch.in_flight)

    def _expire(self, index: _Model, model: str, now: datetime) -> None:
        """Expiry (README decisions): once a batch's deadline passes it claims nothing more;
        unsent rows fail ``BatchTerminated`` and in-flight ones are aborted to end so too."""
        while index.deadlines and index.deadlines[0][0] <= now:
            _, batch_id = heapq.heappop(index.deadlines)
            batch = index.batches.get(batch_id)
            if batch is not None and batch.entry.closed is None and batch.entry.facts.deadline <= now:  # fmt: skip
                self._close(model, batch_id, "expire", now)

    # -- reclaim --------------------------------------------------------------------------

    def _reclaim_stale(self, model: str, now: datetime) -> None:
        index = self.models.get(model)
        if index is None:
            return
        for request_id in list(index.in_flight):
            entry = self._request(request_id)
            if entry is None:
                continue
            reason = self._stale_reason(request_id, entry, now)
            if reason is not None:
                self._take_back(request_id, entry, reason, now)
            elif entry.state == "processing":
                self._ask_again(request_id, entry, now)

    def _forget_words(self, request_id: str) -> None:
        """The row left flight: what memory held of its call (asked again, heard of) goes."""
        self.asked.pop(request_id, None)
        self.heard.pop(request_id, None)

    def _started(self, request_id: str, entry: GateRequest) -> datetime | None:
        """When the row's holder last said it runs it: the record's time, or newer in memory."""
        heard = self.heard.get(request_id)
        if heard is None or entry.started_at is None or heard < entry.started_at:
            return entry.started_at
        return heard

    def _ask_again(self, request_id: str, entry: GateRequest, now: datetime) -> None:
        """Dispatch a call quiet for a claim timeout again, same claim, same partition. Its
        executor ignores a claim it runs, answers one it ended from its memory of outcomes and
        hands back one it never saw (ignored while the row is processing): only a report
        lost on the way changes anything, and then the row ends without waiting for the
        processing timeout. Asked at most once a claim timeout (in memory: a rebuilt gate may
        ask once more)."""
        quiet = self.liveness.claim_timeout
        started = self._started(request_id, entry)
        since = max(filter(None, (started, self.asked.get(request_id))), default=now)
        if now - since <= quiet or entry.claim_id is None or entry.claimed_at is None:
            return
        batch = self._model(entry.model).batches.get(entry.batch_id)
        if batch is None and (entry.batch_id or entry.facts is None or entry.body is None):
            return  # nothing left to dispatch it from
        self.asked[request_id] = now
        self._send(request_id, entry, batch)

    def _take_back(self, request_id: str, entry: GateRequest, reason: Any, now: datetime) -> None:
        """Return a claim to pending as a new attempt (core §4.8), or end it."""
        if entry.abort is not None:
            self._abort_end(request_id, entry, now)
            return
        attempt = entry.attempt + 1
        limit = self.liveness.max_retries
        if limit is not None and attempt > limit:
            self._fail(request_id, entry, TaskTerminated(), now)
            return
        claim = entry.claim_id
        assert claim is not None
        if entry.state == "processing":
            # The call may still be running somewhere (a slow or partitioned executor): stop
            # it rather than pay for it twice; its report is fenced out anyway.
            self._abort(request_id, claim, entry.partition, now)
        entry.attempt = attempt
        self._transition(request_id, entry, RequestReclaimed(
            **self._common(request_id, entry, now, "reclaimed", claim), claim_id=claim,
            attempt=attempt, reason=reason,
        ))  # fmt: skip

    def _stop(
        self,
        request_id: str,
        entry: GateRequest,
        now: datetime,
        path: str | None = None,
        erased: bool = False,
    ) -> None:
        """Abort an in-flight row's call; a response with tools runs as a chain (which the
        executor handed it to), so the chain agent is told too. ``path``: a batch row's."""
        claim = entry.claim_id
        assert claim is not None
        self._abort(request_id, claim, entry.partition, now)
        if (path or (entry.facts and entry.facts.path)) == RESPONSES_PATH:
            aborted = ChainAborted(
                event_id=ids.event_id("chain-aborted", claim), occurred_at=now,
                response_id=request_id, claim_id=claim, erased=erased,
            )  # fmt: skip
            self._out.append(Out("responses", request_id, aborted))

    def _abort(self, request_id: str, claim_id: str, partition: int, now: datetime) -> None:
        abort = AbortDispatch(
            event_id=ids.event_id("abort", claim_id), occurred_at=now,
            request_id=request_id, claim_id=claim_id,
        )  # fmt: skip
        self._out.append(Out("dispatch", request_id, abort, partition=partition))

    def _stale_reason(self, request_id: str, entry: GateRequest, now: datetime) -> str | None:
        live = self.liveness
        if entry.state == "claimed":
            claimed = entry.claimed_at or now
            return "claim_timeout" if now - claimed > live.claim_timeout else None
        if entry.worker_id in self.workers_dead:
            return "worker_dead"
        started = self._started(request_id, entry)
        if started is not None and now - started > live.processing_timeout:
            return "processing_timeout"
        seen = self.worker_seen.get(entry.worker_id or "")
        # A worker never heard from since this gate started gets the threshold from the start.
        last = seen or self.started_at or now
        if (self.clock or now) - last > live.stale_worker:
            return "worker_stale"
        return None

    # -- claiming -------------------------------------------------------------------------

    def _claim(self, model: str, now: datetime) -> None:
        index = self.models.get(model)
        if index is None:
            return
        self._release_due(index, now)
        self._expire(index, model, now)
        limit = self.limits.get(model, 0) * (1 + self.config.prefetch)
        capacity = min(limit - len(index.in_flight), self.config.claim_batch_size)
        if capacity <= 0:
            return
        if not index.batches and not index.loose:
            return
        raw_state = self.state.get(f"M:{model}")
        self._let_go_spent_tokens(now)
        moved_on: list[str] = []  # batchless rows read that are no longer claimable
        if scoring.is_live(None if raw_state is None else raw_state.decode()):
            runs = self._runs(index, moved_on)
            takes = scoring.select_live(capacity, runs, self.owner_active, now, self.config)
        else:
            ramping, waiting = self._paced(index, now, moved_on)
            # (owner, window-class) buckets of the model without a token
            cooling = self.buckets.cooling.get(model, {}).keys()
            takes = scoring.select_paced(
                capacity, ramping, waiting, self.owner_active, cooling, now, self.config
            )
        for request_id in moved_on:
            index.drop_loose(request_id)
        for take in takes:
            if not take.unit.batch:
                claimed = self._claim_loose(index, take.unit.id, now)
            else:
                batch = index.batches[take.unit.id]
                lines = self._take_lines(batch, take.count)
                for line in lines:
                    self._claim_one(batch, line, now)
                self._put_batch(batch)
                claimed = bool(lines)
            if take.leaked and claimed:
                unit = take.unit
                at = scoring.next_token_at(now, unit.window_s, self.config.leaks_per_window)
                key = _bucket_key(unit.owner, unit.window_class, model)
                self.buckets.set(key, at)
                self.state[key] = at.isoformat().encode()

    def _loose_units(
        self,
        index: _Model,
        rows: Iterable[tuple[datetime, str]],
        moved_on: list[str],
    ) -> Iterator[scoring.Unit]:
        """The batchless ``rows`` still claimable, as units, in that order; those no longer
        pending noted in ``moved_on``."""
        for _, request_id in rows:
            entry = self._request(request_id)
            if entry is None or entry.facts is None or entry.state != "pending" or entry.not_before:
                moved_on.append(request_id)  # it moved on since it was queued
                continue
            owner, window_class, window_s = self._row_kind(entry.facts)
            yield scoring.Unit(
                id=request_id, batch=False, owner=owner, deadline=entry.facts.deadline,
                window_s=window_s, window_class=window_class,
            )  # fmt: skip

    def _row_kind(self, facts: BatchlessFacts) -> Kind:
        tier = facts.service_tier
        return (
            facts.owner,
            scoring.window_class_for_batchless(tier),
            self.config.window_for_tier(tier),
        )

    def _runs(self, index: _Model, moved_on: list[str]) -> Iterator[Iterator[scoring.Unit]]:
        """The claimable units in runs for :func:`scoring.select_live`, each in (deadline, id)
        order and of owners with the same number of rows in flight: one run per owner with
        rows in flight (at most the gate's claims in flight), one for every other owner."""
        active = self.owner_active
        batches, rows = index.ranked, index.loose_ranked
        yield _merged(
            _units(index, batches.others(active)),
            self._loose_units(index, rows.others(active), moved_on),
        )
        for owner in active:
            mine = []
            if owner in batches.kinds:
                mine.append(_units(index, batches.owned(owner)))
            if owner in rows.kinds:
                mine.append(self._loose_units(index, rows.owned(owner), moved_on))
            if mine:
                yield _merged(*mine)

    def _paced(
        self, index: _Model, now: datetime, moved_on: list[str]
    ) -> tuple[list[Iterator[scoring.Unit]], list[scoring.Unit]]:
        """A not-live model's units for :func:`scoring.select_paced`: each kind's run within
        its ramp, and the first claimable unit past it."""
        exponent = self.config.claim_ramp_exponent
        ramping: list[Iterator[scoring.Unit]] = []
        waiting: list[scoring.Unit] = []
        sources: list[tuple[_Ranked, _Reader]] = [
            (index.ranked, lambda pairs: _units(index, pairs)),
            (index.loose_ranked, lambda pairs: self._loose_units(index, pairs, moved_on)),
        ]
        for ranked, units in sources:
            for kind, pairs in ranked.by_kind.items():
                at = _ramping_end(pairs, kind[2], now, exponent)
                if at:
                    ramping.append(units(itertools.islice(pairs, at)))
                if after := next(units(itertools.islice(pairs, at, None)), None):
                    waiting.append(after)
        return ramping, waiting

    def _claim_loose(self, index: _Model, request_id: str, now: datetime) -> bool:
        entry = self._request(request_id)
        index.drop_loose(request_id)
        if entry is None or entry.facts is None or entry.body is None:
            return False
        self._new_claim(request_id, entry, now)
        self._send(request_id, entry, None)
        return True

    def _let_go_spent_tokens(self, now: datetime) -> None:
        """Before a cycle, tokens of any model that came back are dropped (they carry no
        state)."""
        for key in self.buckets.expire(now):
            self.state.pop(key, None)

    def _release_due(self, index: _Model, now: datetime) -> None:
        while index.delayed and index.delayed[0][0] <= now.timestamp():
            due, request_id = heapq.heappop(index.delayed)
            entry = self._request(request_id)
            if entry is None or entry.state != "pending" or entry.not_before is None:
                continue
            if entry.not_before.timestamp() != due:
                continue  # a wait of an earlier run of the row (cancelled, then retried)
            entry.not_before = None
            self._put_request(request_id, entry)
            if not entry.batch_id or entry.batch_id in index.batches:
                self._queue(request_id, entry)

    def _take_lines(self, batch: _Batch, count: int) -> list[int]:
        """The next ``count`` claimable lines of a batch, in line order: never-claimed lines
        and lines back to pending, merged."""
        taken: list[int] = []
        ranges = batch.entry.unclaimed
        while len(taken) < count and (ranges or batch.returned):
            if batch.returned and (not ranges or batch.returned[0] < ranges[0].start):
                line = heapq.heappop(batch.returned)
                request_id = ids.request_id(batch.entry.facts.batch_id, line)
                entry = self._request(request_id)
                if entry is not None and entry.state == "pending" and entry.not_before is None:
                    taken.append(line)
                continue
            head = ranges[0]
            taken.append(head.start)
            batch.unclaimed_lines -= 1
            if head.start + 1 >= head.end:
                ranges.pop(0)
            else:
                ranges[0] = LineRange(head.start + 1, head.end)
        return taken

    def _claim_one(self, batch: _Batch, line: int, now: datetime) -> None:
        facts = batch.entry.facts
        request_id = ids.request_id(facts.batch_id, line)
        entry = self._request(request_id)
        if entry is None:
            entry = GateRequest(
                model=batch.entry.model, state="pending", batch_id=facts.batch_id, line=line,
                version=facts.retry_version,
            )  # fmt: skip
            batch.live += 1
        self._new_claim(request_id, entry, now)
        self._send(request_id, entry, batch)

    def _send(self, request_id: str, entry: GateRequest, batch: _Batch | None) -> None:
        """Dispatch the row's current claim to its partition: a batch row's facts and body
        are its batch's (``batch``), a batchless row's its own."""
        assert entry.claim_id is not None and entry.claimed_at is not None
        facts: BatchFacts | BatchlessFacts
        if batch is not None:
            facts = batch.entry.facts
            body = batch.entry.body_ref(entry.line)
            if facts.headers:
                self._headers.setdefault(entry.partition, {})[facts.batch_id] = facts.headers
        else:
            assert entry.facts is not None and entry.body is not None
            facts, body = entry.facts, entry.body
        self._dispatch.setdefault(entry.partition, []).append(DispatchItem(
            request_id=request_id, claim_id=entry.claim_id, batch_id=entry.batch_id or None,
            model=entry.model, path=facts.path, attempt=entry.attempt, deadline=facts.deadline,
            claimed_at=entry.claimed_at, body=body, owner=facts.owner, lane=entry.lane,
        ))  # fmt: skip

    def _new_claim(self, request_id: str, entry: GateRequest, now: datetime) -> str:
        """Make a pending row claimed by a new claim; returns the claim id."""
        entry.claims += 1
        claim_id = ids.claim_id(request_id, entry.claims, entry.version)
        entry.claim_id, entry.claimed_at = claim_id, now
        if self.config.prefetch > 0:
            entry.lane = self._model(entry.model).pick_lane(self.limits[entry.model])
        entry.partition = self._dispatch_partition(request_id, entry)
        self._transition(request_id, entry, RequestClaimed(
            event_id=ids.event_id("claimed", claim_id), occurred_at=now, request_id=request_id,
            batch_id=entry.batch_id or None, model=entry.model, from_state="pending",
            claim_id=claim_id, worker_id=self.worker_id, attempt=entry.attempt,
        ))  # fmt: skip
        return claim_id

    def _dispatch_partition(self, request_id: str, entry: GateRequest) -> int:
        """A decision re-made after a crash must reach the executor that may be running its
        claims still (which answers rather than call twice). Without lanes every claim of a
        request goes to one partition, and runs of consecutive lines share one, so a
        decision's claims travel in few records. With lanes, a lane's claims share one, so
        that one executor runs them in turn; the re-made decision picks the same lanes from
        the same table."""
        if entry.lane >= 0:
            key = f"{entry.model}:{entry.lane}"
        elif entry.batch_id:
            key = f"{entry.batch_id}:{entry.line // DISPATCH_CHUNK}"
        else:
            key = request_id
        return bodies.partition_for(key, self.dispatch_partitions)


#: Builds the units of some of a ``_Ranked``'s pairs, in their order.
_Reader = Callable[[Iterable[tuple[datetime, str]]], Iterator[scoring.Unit]]


def _batch_kind(facts: BatchFacts) -> Kind:
    return facts.owner, facts.window_class, facts.window_s


def _ramping_end(pairs: list[tuple[datetime, str]], window_s: float, now: datetime, exponent: float) -> int:  # fmt: skip
    """How many of one kind's ``pairs`` are within their ramp: they come first."""
    return bisect.bisect_left(
        pairs, True, key=lambda pair: not scoring.within_ramp(pair[0], window_s, now, exponent)
    )


def _units(index: _Model, batches: Iterable[tuple[datetime, str]]) -> Iterator[scoring.Unit]:
    """The claimable batches of ``batches``, as units, in that order."""
    for _, batch_id in batches:
        b = index.batches[batch_id]
        facts = b.entry.facts
        # counted, not the range list's truth: an empty range leaves a list with nothing in it
        available = b.unclaimed_lines + len(b.returned)
        if b.entry.closed is None and available:
            yield scoring.Unit(
                id=batch_id, batch=True, owner=facts.owner, deadline=facts.deadline,
                window_s=facts.window_s, window_class=facts.window_class, available=available,
            )  # fmt: skip


def _order(unit: scoring.Unit) -> tuple[datetime, str]:
    return unit.deadline, unit.id


def _merged(*runs: Iterator[scoring.Unit]) -> Iterator[scoring.Unit]:
    """Runs in (deadline, id) order, merged (one run is already its own merge)."""
    return runs[0] if len(runs) == 1 else heapq.merge(*runs, key=_order)


def _records(events: list[RequestEvent]) -> Iterator[list[RequestEvent]]:
    """Events cut into records of at most ``EVENTS_PER_RECORD`` rows each."""
    chunk: list[RequestEvent] = []
    rows = 0
    for event in events:
        weight = len(event.items) if isinstance(event, RequestsPending) else 1
        if chunk and rows + weight > EVENTS_PER_RECORD:
            yield chunk
            chunk, rows = [], 0
        chunk.append(event)
        rows += weight
    if chunk:
        yield chunk


def _run(version: int) -> tuple[int, ...]:
    """The part of a row's terminal event id that tells its runs apart: each retry ends the
    row anew, and consumers take equal event ids for one event redelivered. A first run's id
    is as it always was."""
    return () if version == 0 else (version,)


def _lines(ranges: list[LineRange]) -> set[int]:
    return {line for r in ranges for line in range(r.start, r.end)}


def _with_line(ranges: list[LineRange], line: int) -> list[LineRange]:
    """Sorted, disjoint ``ranges`` with ``line`` in them, joined to its neighbours: one row
    back among a batch's 50,000 lines costs a search, not a rebuild of every line."""
    at = bisect.bisect_right(ranges, line, key=lambda r: r.start)
    before = ranges[at - 1] if at else None
    after = ranges[at] if at < len(ranges) else None
    if before is not None and line < before.end:
        return ranges  # there already
    start = before.start if before is not None and before.end == line else line
    end = after.end if after is not None and after.start == line + 1 else line + 1
    first = at - 1 if start != line else at
    last = at + 1 if end != line + 1 else at
    return [*ranges[:first], LineRange(start, end), *ranges[last:]]


def _ranges(lines: list[int]) -> list[LineRange]:
    """Sorted lines as ranges of consecutive lines."""
    out: list[LineRange] = []
    for line in lines:
        if out and out[-1].end == line:
            out[-1] = LineRange(out[-1].start, line + 1)
        else:
            out.append(LineRange(line, line + 1))
    return out


def _bucket_key(owner: str, window_class: str, model: str) -> str:
    return "K:" + "\x1f".join((owner, window_class, model))


def _bucket_parts(key: str) -> tuple[str, str, str]:
    """(owner, window-class, model) of a bucket key, split from the right: an owner's name may
    hold the separator; window classes and model names do not."""
    owner, window_class, model = key[2:].rsplit("\x1f", 2)
    return owner, window_class, model
