"""A file's download read page by page (projections/api/files.py ``Window``): a page of
``limit`` lines reads one more to tell the caller whether more exist (``X-Incomplete``)."""

from __future__ import annotations

import pytest

from projections.api.files import PAGE, Window


def read(total: int, limit: int | None) -> tuple[int, int]:
    """Lines a download of ``limit`` reads from a file of ``total``, and its largest page."""
    window, done, largest = Window(limit), 0, 0
    while True:
        size = window.size()
        got = min(size, total - done)
        done, largest = done + got, max(largest, size)
        if not window.more(got, size):
            return done, largest


@pytest.mark.parametrize("limit", [0, 1, PAGE - 1, PAGE, PAGE + 1, 2 * PAGE, 1199])
def test_a_page_of_limit_lines_reads_one_more_to_tell_that_more_exist(limit: int) -> None:
    assert read(1200, limit)[0] == limit + 1


@pytest.mark.parametrize("limit", [1200, 1500, None])
def test_a_download_that_reaches_the_end_reads_every_line(limit: int | None) -> None:
    assert read(1200, limit)[0] == 1200
    assert read(2 * PAGE, limit)[0] == 2 * PAGE


def test_no_page_asks_for_more_than_a_page() -> None:
    assert read(5000, None)[1] == PAGE
    assert read(5000, 3 * PAGE)[1] == PAGE
