"""Metrics every process shares, and the rules that keep label values few.

Prometheus keeps one series per label combination, so a label may only take values from a
small known set: configured model names, status codes, route patterns, reason classes. Ids
(request, batch, claim, user) never become labels. The write path's metrics are in
:mod:`streams.metrics`, the read path's in :mod:`projections.metrics`; each process serves
the default registry at ``/metrics`` (:mod:`cannonade.health`).
"""

from __future__ import annotations

from collections.abc import Collection

from prometheus_client import Counter, Gauge

from cannonade import __version__, heap

OTHER = "other"

DEAD_LETTERS = Counter(
    "cannonade_dead_letters_total",
    "Records set aside on the dead-letter topic, by source topic and reason class",
    ["topic", "reason"],
)
PROCESS_INFO = Gauge(
    "cannonade_process_info", "Always 1: the role and version of this process", ["role", "version"]
)

# Dead-letter reasons are free text; these phrases (lowercase) name their class, first match.
_REASON_CLASSES = (
    ("invalid message", "undecodable"),
    ("undecodable", "undecodable"),
    ("empty", "undecodable"),
    ("must be keyed by", "wrong_key"),
    ("needs a key", "wrong_key"),
    ("unknown body key", "wrong_key"),
    ("does not apply to", "state_machine"),
    ("could not apply it", "handler_error"),
    ("read model refused", "read_model_refused"),
)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def announce(role: str) -> None:
    """Say which role this process plays, and start timing its garbage collections."""
    PROCESS_INFO.labels(role, __version__).set(1)
    heap.watch()


def dead_letter_reason(reason: str) -> str:
    """The class of a dead letter's free-text reason (``other`` when none matches)."""
    text = reason.lower()
    return next((label for phrase, label in _REASON_CLASSES if phrase in text), OTHER)


def dead_letter(topic: str, reason: str, kind: str | None = None) -> None:
    """Count a dead letter; ``kind`` names its class where the text cannot (a rule's own
    message, say)."""
    DEAD_LETTERS.labels(topic, kind or dead_letter_reason(reason)).inc()


def model_label(model: str, known: Collection[str]) -> str:
    """A model's name if it is configured; anything a user typed otherwise is one value."""
    return model if model in known else OTHER


def status_label(status: int) -> str:
    return str(status) if 100 <= status <= 599 else OTHER


def method_label(method: str) -> str:
    return method if method in _METHODS else OTHER
