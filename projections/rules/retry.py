"""Which rows a retry names (core §2.3 retry_failed_requests_for_batch, §2.4 retry by ids):
the rows as line ranges per model, as `RetryBatch` carries them, and the ids a caller gives."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from schemas.api import MAX_REQUEST_IDS
from schemas.commands import RowRanges
from schemas.errors import invalid_request
from schemas.events import LineRange

# A batch row's id as the output and error files show it.
_LINE_PREFIX = "batch_req_"


def row_ranges(rows: Iterable[tuple[str, int]]) -> list[RowRanges]:
    """(model, line) pairs → per model (sorted by model), sorted runs of consecutive lines as
    [start, end) ranges; a line given twice counts once."""
    by_model: dict[str, set[int]] = {}
    for model, line in rows:
        by_model.setdefault(model, set()).add(line)
    out: list[RowRanges] = []
    for model in sorted(by_model):
        ranges: list[LineRange] = []
        for line in sorted(by_model[model]):
            if ranges and ranges[-1].end == line:
                ranges[-1] = LineRange(ranges[-1].start, line + 1)
            else:
                ranges.append(LineRange(line, line + 1))
        out.append(RowRanges(model, ranges))
    return out


def parse_request_ids(body: Any) -> list[str]:
    """`{"request_ids": [...]}` → canonical request uuids in the order given, each once. An id
    may be the plain uuid or the `batch_req_<uuid>` of an output or error line."""
    if not isinstance(body, dict) or "request_ids" not in body:
        raise invalid_request("request_ids is required", param="request_ids")
    given = body["request_ids"]
    if not isinstance(given, list) or not given:
        raise invalid_request("request_ids must be a non-empty list of ids", param="request_ids")
    if len(given) > MAX_REQUEST_IDS:
        raise invalid_request(
            f"request_ids may name at most {MAX_REQUEST_IDS} requests", param="request_ids"
        )
    out: dict[str, None] = {}
    for item in given:
        if not isinstance(item, str):
            raise invalid_request("request_ids must be a list of strings", param="request_ids")
        try:
            out[str(uuid.UUID(item.removeprefix(_LINE_PREFIX)))] = None
        except ValueError:
            raise invalid_request(
                f"Invalid request ID format: '{item[:100]}'", param="request_ids"
            ) from None
    return list(out)
