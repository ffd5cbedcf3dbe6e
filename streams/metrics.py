"""The write path's metrics, and the hooks the agents call.

The agents count what they publish and observe (the gate's lifecycle records, the executor's
upstream calls); the rules (:mod:`streams.gate.core`, :mod:`streams.population`) stay free of
them. Model labels are configured model names only (:func:`cannonade.metrics.model_label`).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from datetime import timedelta
from typing import get_args

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY

from cannonade.metrics import OTHER, model_label, status_label
from schemas.events import (
    RequestCanceled,
    RequestClaimed,
    RequestCompleted,
    RequestFailed,
    RequestReclaimed,
    RequestRetried,
    RequestRetryScheduled,
    RequestTransitions,
)
from streams.emit import Out
from streams.execution.failure import FailureReason
from streams.execution.outcome import Failure, Outcome

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

CLAIMED = Counter("cannonade_requests_claimed_total", "Claims made by the gate", ["model"])
COMPLETED = Counter("cannonade_requests_completed_total", "Requests that completed", ["model"])
FAILED = Counter(
    "cannonade_requests_failed_total",
    "Requests that failed for good, by failure variant",
    ["model", "error_type"],
)
RETRIED = Counter(
    "cannonade_requests_retried_total",
    "Requests sent back to pending for another attempt: backoff after a retriable failure, "
    "a claim taken back (its reason), or a user's retry (requested)",
    ["model", "reason"],
)
CANCELED = Counter("cannonade_requests_canceled_total", "Requests canceled", ["model"])
GATE_DECISION = Histogram(
    "cannonade_gate_decision_duration_seconds",
    "Time the gate takes to fold one input and decide its claims",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
CLAIM_LATENCY = Histogram(
    "cannonade_claim_latency_seconds",
    "From the gate's claim to the executor starting the call",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
LANE_HANDOFFS = Counter(
    "cannonade_lane_handoffs_total",
    "Claims that left a prefetch lane (their call ended, or they were handed back unsent), by "
    "whether the lane's next claim was already queued behind them (queued: the upstream slot "
    "went to it at once) or not (none: the slot waits for the gate's next claim, or for work)",
    ["model", "next"],
)
UPSTREAM_DURATION = Histogram(
    "cannonade_upstream_request_duration_seconds",
    "Duration of one upstream call (one attempt), by the model that served it",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_RESPONSES = Counter(
    "cannonade_upstream_responses_total",
    "Upstream call outcomes: the HTTP status, or the failure variant when there was none",
    ["model", "status"],
)
EXECUTOR_RUNNING = Gauge("cannonade_executor_running_calls", "Claims this executor is running now")
COMMANDS = Counter("cannonade_commands_total", "Commands handled, by type", ["command"])
REFETCHED = Counter(
    "cannonade_input_records_refetched_total",
    "Input records the consumer dropped that an agent read again (streams.gapless)",
    ["topic"],
)
STEPS_HANDED_OUT_AGAIN = Counter(
    "cannonade_chain_steps_handed_out_again_total",
    "Work of chain steps handed out again after their chain was quiet a step deadline: a step "
    "executor lost it (each then ends step_abandoned, or runs if it never started)",
)

_FAILURE_VARIANTS = frozenset(variant.__name__ for variant in get_args(FailureReason))


class Hooks:
    """What the agents of one worker call; knows the configured models so that a model
    name typed by a user never becomes a label value."""

    def __init__(self, models: Collection[str]) -> None:
        self.models = frozenset(models)

    def model(self, name: str) -> str:
        return model_label(name, self.models)

    def gate_published(self, outs: Sequence[Out], seconds: float) -> None:
        """A gate decision: count the transitions it publishes."""
        GATE_DECISION.observe(seconds)
        for (kind, model, detail), n in _tally(outs).items():
            label = self.model(model)
            if kind is RequestClaimed:
                CLAIMED.labels(label).inc(n)
            elif kind is RequestCompleted:
                COMPLETED.labels(label).inc(n)
            elif kind is RequestFailed:
                FAILED.labels(label, detail).inc(n)
            elif kind is RequestCanceled:
                CANCELED.labels(label).inc(n)
            else:
                RETRIED.labels(label, detail).inc(n)

    def claim_started(self, model: str, latency: timedelta) -> None:
        CLAIM_LATENCY.labels(self.model(model)).observe(max(latency.total_seconds(), 0.0))

    def lane_released(self, model: str, next_queued: bool) -> None:
        LANE_HANDOFFS.labels(self.model(model), "queued" if next_queued else "none").inc()

    def upstream_called(self, model: str, outcome: Outcome, seconds: float) -> None:
        label = self.model(model)
        UPSTREAM_DURATION.labels(label).observe(seconds)
        UPSTREAM_RESPONSES.labels(label, upstream_status(outcome)).inc()

    def command(self, name: str) -> None:
        COMMANDS.labels(name).inc()

    def running(self, count: Callable[[], int]) -> None:
        EXECUTOR_RUNNING.set_function(count)


def upstream_status(outcome: Outcome) -> str:
    """An HTTP status code, or the failure variant of a call that got no response."""
    if not isinstance(outcome, Failure):
        return status_label(outcome.status)
    reason: FailureReason = outcome.reason
    status = getattr(reason, "status", None)
    if isinstance(status, int):
        return status_label(status)
    name = type(reason).__name__
    return name if name in _FAILURE_VARIANTS else OTHER


_Key = tuple[type, str, str]


def _tally(outs: Iterable[Out]) -> Tally[_Key]:
    """(event type, model, detail) -> count, over the counted lifecycle events in ``outs``."""
    counts: Tally[_Key] = Tally()
    for out in outs:
        if not isinstance(out.value, RequestTransitions):
            continue
        for event in out.value.events:
            match event:
                case RequestClaimed() | RequestCompleted() | RequestCanceled():
                    counts[(type(event), event.model, "")] += 1
                case RequestFailed():
                    detail = event.error_type if event.error_type in _FAILURE_VARIANTS else OTHER  # fmt: skip
                    counts[(RequestFailed, event.model, detail)] += 1
                case RequestRetryScheduled():
                    counts[(RequestRetryScheduled, event.model, "backoff")] += 1
                case RequestReclaimed():
                    counts[(RequestReclaimed, event.model, event.reason)] += 1
                case RequestRetried():
                    counts[(RequestRetried, event.model, "requested")] += 1
    return counts


class Backlog:
    """``cannonade_requests_pending`` and ``cannonade_requests_in_flight`` by model and
    completion window, read from the gate's own state when scraped. A combination seen once
    stays at 0 afterwards, so a drained queue shows 0 rather than vanishing."""

    def __init__(self, read: Callable[[], dict[tuple[str, str], tuple[int, int]]], hooks: Hooks) -> None:  # fmt: skip
        self.read = read
        self.hooks = hooks
        self.seen: set[tuple[str, str]] = set()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        current: dict[tuple[str, str], list[int]] = {}
        for (model, window), (pending, in_flight) in self.read().items():
            counts = current.setdefault((self.hooks.model(model), window), [0, 0])
            counts[0] += pending
            counts[1] += in_flight
        self.seen |= current.keys()
        pending_family = GaugeMetricFamily(
            "cannonade_requests_pending",
            "Requests waiting for a claim on this gate, by model and completion window",
            labels=["model", "window"],
        )
        in_flight_family = GaugeMetricFamily(
            "cannonade_requests_in_flight",
            "Requests claimed and not yet ended on this gate, by model and completion window",
            labels=["model", "window"],
        )
        for key in sorted(self.seen):
            pending, in_flight = current.get(key, (0, 0))
            pending_family.add_metric(list(key), pending)
            in_flight_family.add_metric(list(key), in_flight)
        yield pending_family
        yield in_flight_family

    def register(self) -> None:
        REGISTRY.register(self)
