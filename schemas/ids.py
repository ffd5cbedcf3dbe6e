"""Deterministic identities, so that redelivered commands and decisions are recognisable.

Population derives request ids from (batch, line) and template ids from (file, line): handling
the same command twice yields the same rows. Decisions derive their event ids from what they
decide, so a decision published twice is one event seen twice. Outside consumers can derive
them too: every derived id is ``uuid5(NAMESPACE, "/".join(parts))``.
"""

from __future__ import annotations

import hashlib
import uuid

# Fixed namespace for every name-based UUID Cannonade derives.
NAMESPACE = uuid.UUID("6f1c4a53-3a0e-4d61-9d2e-0c2b8e7c4a11")
_NAMESPACE_BYTES = NAMESPACE.bytes


def derived(*parts: object) -> str:
    """``str(uuid.uuid5(NAMESPACE, "/".join(parts)))``, computed without building ``UUID``
    objects: the gate derives several ids per claim, and ``uuid.UUID`` was a tenth of its CPU."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + "/".join(map(str, parts)).encode()).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def request_id(batch_id: str, line_number: int) -> str:
    return derived("request", batch_id, line_number)


def claim_id(request_id: str, claims: int, retry_version: int = 0) -> str:
    """A claim's id: after an explicit retry the claims count starts again, under a new
    version, so no claim ever gets an earlier claim's id."""
    if retry_version:
        return derived("claim", request_id, f"v{retry_version}", claims)
    return derived("claim", request_id, claims)


def output_file_id(batch_id: str) -> str:
    return derived("output-file", batch_id)


def error_file_id(batch_id: str) -> str:
    return derived("error-file", batch_id)


def file_id_for(owner: str, idempotency_key: str) -> str:
    """The file an upload with an ``Idempotency-Key`` creates: a retry names the same file.

    The parts are joined with ``/``, so an owner holding one would share ids with another
    (``acme`` + ``ml/k`` and ``acme/ml`` + ``k``): such an owner's ids take its length too, in
    a namespace of their own, and every other owner's stay as they were."""
    if "/" in owner:
        return derived("file-owner-length", len(owner), owner, idempotency_key)
    return derived("file", owner, idempotency_key)


def event_id(kind: str, *parts: object) -> str:
    return derived("event", kind, *parts)


def new_id() -> str:
    return str(uuid.uuid4())
