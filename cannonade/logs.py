"""Logging for every process: one JSON object per line, or a human format on a terminal.

Every record — ours, Faust's, aiokafka's, aiohttp's — goes through one stdlib handler whose
formatter is structlog's, so each line carries the same fields: ``time`` (ISO 8601, UTC),
``level``, ``role`` (api, projector, purge, commands, gate, executor, chains), ``pid``,
``logger``, ``message``, and the ids of what is being worked on (``request_id``,
``batch_id``, ``claim_id``, ``worker``…) that the code bound with :func:`bind` for the
current task.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import AbstractContextManager
from typing import TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

FORMATS = ("auto", "json", "console")


def bind(**ids: object) -> None:
    """Name the ids of the work the current task (or context) does: every line it logs
    from now on carries them. An asyncio task has a copy of its creator's context, so ids
    bound inside a task stay with it."""
    structlog.contextvars.bind_contextvars(**ids)


def bound(**ids: object) -> AbstractContextManager[None]:
    """Like :func:`bind`, for the lines logged within the block only."""
    return structlog.contextvars.bound_contextvars(**ids)


def choose_format(fmt: str, stream: TextIO) -> str:
    """``auto`` is console on a terminal, json otherwise (a file, a pipe, a collector)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format '{fmt}' is not one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


def _process(role: str) -> Processor:
    pid = os.getpid()

    def add(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
        event.setdefault("role", role)
        event.setdefault("pid", pid)
        return event

    return add


_LEADING = ("time", "level", "role", "message")


def _leading_fields(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """The fields a reader looks for first, first on the line."""
    return {
        **{k: event[k] for k in _LEADING if k in event},
        **{k: v for k, v in event.items() if k not in _LEADING},
    }


def configure(
    role: str, fmt: str = "auto", level: str | int = "info", stream: TextIO | None = None
) -> logging.Handler:
    """Route every logger of this process through one handler on ``stream`` (stderr by
    default) in format ``fmt``; returns that handler."""
    stream = stream or sys.stderr
    chosen = choose_format(fmt, stream)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        # The console renderer puts `timestamp` first on the line.
        structlog.processors.TimeStamper(
            fmt="iso", utc=True, key="time" if chosen == "json" else "timestamp"
        ),
        _process(role),
        structlog.stdlib.ExtraAdder(),
    ]
    renderer: list[Processor]
    if chosen == "json":
        renderer = [
            structlog.processors.format_exc_info,
            structlog.processors.EventRenamer("message"),
            _leading_fields,
            structlog.processors.JSONRenderer(),
        ]
    else:
        renderer = [
            structlog.dev.ConsoleRenderer(
                colors=choose_format("auto", stream) == "console",
                # structlog's default shows every frame's locals: API keys, prompts, the
                # database password. A traceback without them says where it failed.
                exception_formatter=structlog.dev.plain_traceback,
            )
        ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)  # Python's warnings as log lines too, not bare text
    # Chatty at INFO (every connection and coordinator step); their warnings still show.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    return handler
