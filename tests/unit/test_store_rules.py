"""When an executor may take a dispatch as superseded (pure part of streams/store.py)."""

from __future__ import annotations

import pytest

from streams.store import ProjectedClaim


@pytest.mark.parametrize(
    ("projected", "stale"),
    [
        (ProjectedClaim("claimed", 1, "c1"), False),  # the projection shows this very claim
        (ProjectedClaim("processing", 1, "c1"), True),  # this claim already started elsewhere
        (ProjectedClaim("pending", 1, None), False),  # reclaimed/retried, not yet re-claimed
        (ProjectedClaim("claimed", 0, "c0"), False),  # projection behind: older attempt's claim
        (ProjectedClaim("processing", 1, "c9"), True),  # another claim of this attempt
        (ProjectedClaim("pending", 2, None), True),  # taken back since this dispatch
        (ProjectedClaim("completed", 1, "c1"), True),  # already ended
        (ProjectedClaim("canceled", 0, None), True),
    ],
)
def test_a_dispatch_is_skipped_only_when_the_request_provably_moved_past_it(
    projected: ProjectedClaim, stale: bool
) -> None:
    assert projected.supersedes("c1", 1) is stale
