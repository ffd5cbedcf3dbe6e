"""Constrained field types shared by every contract.

They put the whole contract into the published JSON Schemas (UUID formats, `date-time`,
allowed shapes), and decoding enforces them, so a message an outside producer writes to the
schema is exactly a message Cannonade accepts. Text that PostgreSQL cannot store (NUL; lone
surrogates, which msgspec rejects by itself) never gets past decoding.

A pattern that only excludes characters (NUL, control characters) is published as a pattern but
enforced by :mod:`schemas.excluded` once per message rather than by msgspec once per field: a
JSON message can only hold those characters escaped, so most messages need no check at all,
and a file's 5,000 lines of metadata decode four times faster.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

UUID_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"

#: A lower-case hyphenated UUID.
Uuid = Annotated[str, msgspec.Meta(pattern=UUID_PATTERN, extra_json_schema={"format": "uuid"})]

NO_NUL = "^[^\\x00]*$"
NO_CONTROL = "^[^\\x00-\\x08\\x0a-\\x1f\\x7f]*$"

#: Text that can be stored anywhere: no NUL character.
Text = Annotated[str, msgspec.Meta(extra_json_schema={"pattern": NO_NUL}, extra={"excludes": NO_NUL})]  # fmt: skip

#: A short identifier-like text (owners, models, paths): no NUL, bounded length.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256, extra_json_schema={"pattern": NO_NUL}, extra={"excludes": NO_NUL})]  # fmt: skip

#: A metadata key: no NUL, at most 64 characters.
MetadataKey = Annotated[str, msgspec.Meta(max_length=64, extra_json_schema={"pattern": NO_NUL}, extra={"excludes": NO_NUL})]  # fmt: skip

#: A line's custom_id: no control character but tab, at most 64 characters.
CustomId = Annotated[str, msgspec.Meta(max_length=64, extra_json_schema={"pattern": NO_CONTROL}, extra={"excludes": NO_CONTROL})]  # fmt: skip

#: A file name: no NUL, at most 1024 characters.
FileName = Annotated[str, msgspec.Meta(max_length=1024, extra_json_schema={"pattern": NO_NUL}, extra={"excludes": NO_NUL})]  # fmt: skip

#: A timezone-aware timestamp (RFC 3339 `date-time`).
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]

#: A completion window as duration text (`24h`, `1h`, `90m`); the allowed set is configuration.
Window = Annotated[str, msgspec.Meta(pattern="^[0-9]{1,9}[smhd]$")]

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
