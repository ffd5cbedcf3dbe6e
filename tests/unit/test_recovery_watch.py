"""The recovery watchdog's rule: a worker whose table recovery stops moving is ended."""

from __future__ import annotations

from streams.recovery_watch import Progress


def test_a_recovery_that_reads_nothing_for_the_bound_is_stalled() -> None:
    progress = Progress(stall_s=60)
    assert not progress.stalled(True, 4383, now=0)
    assert not progress.stalled(True, 4383, now=59)
    assert progress.stalled(True, 4383, now=60)


def test_any_record_read_restarts_the_bound() -> None:
    progress = Progress(stall_s=60)
    progress.stalled(True, 5000, now=0)
    assert not progress.stalled(True, 4999, now=50)  # slow, but moving
    assert not progress.stalled(True, 4999, now=109)
    assert progress.stalled(True, 4999, now=110)


def test_a_rebalance_that_notes_more_to_read_restarts_the_bound() -> None:
    progress = Progress(stall_s=60)
    progress.stalled(True, 100, now=0)
    assert not progress.stalled(True, 900, now=50)  # recovery restarted with new highwaters
    assert not progress.stalled(True, 900, now=109)
    assert progress.stalled(True, 900, now=110)


def test_a_worker_out_of_recovery_is_never_stalled_and_the_next_recovery_starts_afresh() -> None:
    progress = Progress(stall_s=60)
    progress.stalled(True, 10, now=0)
    assert not progress.stalled(False, 10, now=100)
    # A later recovery is measured from its own start.
    assert not progress.stalled(True, 500, now=200)
    assert not progress.stalled(True, 500, now=259)
    assert progress.stalled(True, 500, now=260)


def test_a_recovery_with_nothing_left_to_read_is_never_stalled() -> None:
    # e.g. the broker went away mid-rebalance: a restart would wait for it just the same.
    progress = Progress(stall_s=60)
    assert not progress.stalled(True, 0, now=0)
    assert not progress.stalled(True, 0, now=600)
    # Records to read appear: the bound starts then, not at the first check.
    assert not progress.stalled(True, 70, now=700)
    assert not progress.stalled(True, 70, now=759)
    assert progress.stalled(True, 70, now=760)
