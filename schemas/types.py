"""Constrained field types shared by every contract.

They put the whole contract into the published JSON Schemas (UUID formats, `date-time`,
allowed shapes), and msgspec enforces them when a message is decoded, so a message an outside
producer writes to the schema is exactly a message Cannonade accepts. Text that PostgreSQL
cannot store (NUL; lone surrogates, which msgspec rejects by itself) never gets past decoding.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

UUID_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"

#: A lower-case hyphenated UUID.
Uuid = Annotated[str, msgspec.Meta(pattern=UUID_PATTERN, extra_json_schema={"format": "uuid"})]

#: Text that can be stored anywhere: no NUL character.
Text = Annotated[str, msgspec.Meta(pattern="^[^\\x00]*$")]

#: A short identifier-like text (owners, models, paths): no NUL, bounded length.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern="^[^\\x00]*$")]

#: A timezone-aware timestamp (RFC 3339 `date-time`).
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]

#: A completion window as duration text (`24h`, `1h`, `90m`); the allowed set is configuration.
Window = Annotated[str, msgspec.Meta(pattern="^[0-9]{1,9}[smhd]$")]

NonNegative = Annotated[int, msgspec.Meta(ge=0)]


def has_nul(text: str) -> bool:
    return "\x00" in text
