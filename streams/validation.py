"""The rules a batch must pass to be created, shared by the HTTP API and the commands agent.

The API applies them to answer its caller at once; the commands agent applies them again to
every command, whoever published it, and records a rejection with the same status and message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from schemas.api import MAX_METADATA_KEY, MAX_METADATA_PAIRS, MAX_METADATA_VALUE
from schemas.errors import invalid_request


def check_window(window: str, allowed: Sequence[str]) -> None:
    if window not in allowed:
        raise invalid_request(
            "Unsupported completion_window. Allowed values: " + ", ".join(allowed),
            param="completion_window",
        )


def check_endpoint(endpoint: str, allowed: Sequence[str]) -> None:
    if endpoint not in allowed:
        raise invalid_request(
            f"Unsupported endpoint '{endpoint}'. Supported: " + ", ".join(allowed),
            param="endpoint",
        )


def check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise invalid_request("Invalid 'metadata': expected an object", param="metadata")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise invalid_request(
            f"Invalid 'metadata': too many properties. Expected at most {MAX_METADATA_PAIRS}, "
            f"got {len(metadata)}",
            param="metadata",
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise invalid_request(
                f"Invalid 'metadata': key '{key}' is longer than {MAX_METADATA_KEY} "
                f"characters (got {len(key)})",
                param="metadata",
            )
        if not isinstance(value, str):
            raise invalid_request(f"Invalid 'metadata.{key}': expected a string", param="metadata")
        if len(value) > MAX_METADATA_VALUE:
            raise invalid_request(
                f"Invalid 'metadata.{key}': longer than {MAX_METADATA_VALUE} characters "
                f"(got {len(value)})",
                param="metadata",
            )
        check_storable(key, "metadata")
        check_storable(value, "metadata")
    return metadata


def check_storable(text: str, param: str) -> None:
    """Text PostgreSQL cannot store (NUL) is refused at the edge, never projected."""
    if "\x00" in text:
        raise invalid_request(f"Invalid '{param}': NUL characters are not allowed", param=param)


def check_lines_match_endpoint(first_line_by_url: Mapping[str, int], endpoint: str) -> None:
    """Check 5 of batch creation: every line targets the batch endpoint; ``first_line_by_url``
    maps each distinct url of the file to its first (0-based) line."""
    for url, line in sorted(first_line_by_url.items(), key=lambda item: item[1]):
        if url != endpoint:
            raise invalid_request(
                f"Line {line + 1}: url '{url}' does not match batch endpoint '{endpoint}'"
            )
