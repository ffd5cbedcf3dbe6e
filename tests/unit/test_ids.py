"""Derived ids are a published contract: outside consumers compute them with ``uuid5``."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from schemas import ids

_parts = st.lists(st.one_of(st.text(), st.integers()), max_size=5)


@given(_parts)
def test_derived_ids_are_uuid5_of_the_joined_parts(parts: list[str | int]) -> None:
    expected = uuid.uuid5(ids.NAMESPACE, "/".join(str(p) for p in parts))
    assert ids.derived(*parts) == str(expected)


def test_request_and_claim_ids_a_consumer_can_recompute() -> None:
    request = ids.request_id("batch-1", 7)
    assert request == str(uuid.uuid5(ids.NAMESPACE, "request/batch-1/7"))
    assert ids.claim_id(request, 2, 1) == str(uuid.uuid5(ids.NAMESPACE, f"claim/{request}/v1/2"))


def test_an_idempotency_key_names_one_owner_s_file_whatever_the_owner_s_name() -> None:
    # Joined with "/", "acme" + "ml/k1" and "acme/ml" + "k1" named one file: one user could
    # learn, or take, the id another's upload would create.
    assert ids.file_id_for("acme", "ml/k1") != ids.file_id_for("acme/ml", "k1")
    assert ids.file_id_for("a/b", "c/d") != ids.file_id_for("a/b/c", "d")
    assert ids.file_id_for("acme", "k1") == ids.derived("file", "acme", "k1")  # ids kept
