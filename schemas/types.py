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

#: Character classes a text excludes: NUL, which PostgreSQL cannot store; and every control
#: character but tab, for the custom_ids the upstream gets as a header.
NUL = "\\x00"
CONTROL = "\\x00-\\x08\\x0a-\\x1f\\x7f"


def excluding_pattern(chars: str) -> str:
    """The published pattern of a text excluding the character class ``chars``."""
    return f"^[^{chars}]*$"


def excluding(chars: str, *, min_length: int | None = None, max_length: int | None = None) -> msgspec.Meta:  # fmt: skip
    """A str constraint that publishes :func:`excluding_pattern` and leaves enforcing it to
    :mod:`schemas.excluded`, once per message (``extra["excludes"]``: the class)."""
    return msgspec.Meta(
        min_length=min_length,
        max_length=max_length,
        extra_json_schema={"pattern": excluding_pattern(chars)},
        extra={"excludes": chars},
    )


#: Text that can be stored anywhere: no NUL character.
Text = Annotated[str, excluding(NUL)]

#: A short identifier-like text (owners, models, paths): no NUL, bounded length.
Name = Annotated[str, excluding(NUL, min_length=1, max_length=256)]

#: A metadata key: no NUL, at most 64 characters; a value at most 512.
MetadataKey = Annotated[str, excluding(NUL, max_length=64)]
MetadataValue = Annotated[str, excluding(NUL, max_length=512)]

#: A line's custom_id: no control character but tab, at most 64 characters.
CustomId = Annotated[str, excluding(CONTROL, max_length=64)]

#: A file name: no NUL, at most 1024 characters.
MAX_FILENAME = 1024
FileName = Annotated[str, excluding(NUL, max_length=MAX_FILENAME)]

#: A timezone-aware timestamp (RFC 3339 `date-time`).
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]

#: A completion window as duration text (`24h`, `1h`, `90m`); the allowed set is configuration.
Window = Annotated[str, msgspec.Meta(pattern="^[0-9]{1,9}[smhd]$")]

#: A count or size; the read model keeps it in an ``int`` column, so it fits in 31 bits.
MAX_INT4 = 2**31 - 1
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT4)]
