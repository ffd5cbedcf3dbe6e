"""Following a batch until it ends: a live progress bar on a terminal, one line per change
otherwise (a log, CI, a pipe), both with the rate and an ETA from the recent progress."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cannonade.api_client import Batch, Client, ClientError, Counts

# Rate over the last half minute: recent enough to follow a change of pace, long enough not to
# swing with each poll.
RATE_WINDOW_S = 30.0
# How long the API may stay unreachable (or answer 5xx/429) before watching gives up.
PATIENCE_S = 120.0


class Estimate:
    """Requests per second and time left, from samples of (time, requests ended)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, at: float, ended: int) -> None:
        self.samples.append((at, ended))
        while len(self.samples) > 2 and at - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    def rate(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, e0), (t1, e1) = self.samples[0], self.samples[-1]
        return None if t1 <= t0 else max(e1 - e0, 0) / (t1 - t0)

    def eta_s(self, total: int) -> float | None:
        rate = self.rate()
        if not rate or not self.samples:
            return None
        return max(total - self.samples[-1][1], 0) / rate


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


def rate_text(rate: float | None) -> str:
    return "- req/s" if rate is None else f"{rate:.1f} req/s"


def line(batch: Batch, estimate: Estimate) -> str:
    """One line of progress, as printed when the output is not a terminal."""
    c = batch.request_counts
    return (
        f"{batch.status}: {c.completed}/{c.total} completed, {c.failed} failed, "
        f"{rate_text(estimate.rate())}, ETA {clock(estimate.eta_s(c.total))}"
    )


def poll(
    client: Client,
    batch_id: str,
    interval_s: float,
    console: Console,
    show: Callable[[Batch], None],
) -> Batch:
    """Show the batch every ``interval_s`` until it has ended; returns it as it ended. Passing
    trouble (the API unreachable, 5xx, 429) is reported and waited out up to ``PATIENCE_S``."""
    failing_since: float | None = None
    while True:
        try:
            batch = client.batch(batch_id)
        except ClientError as exc:
            now = time.monotonic()
            if not exc.transient or (failing_since and now - failing_since > PATIENCE_S):
                raise
            failing_since = failing_since or now
            console.print(f"[yellow]still trying:[/] {escape(str(exc))}", highlight=False)
            time.sleep(min(interval_s * 5, 10.0))
            continue
        failing_since = None
        show(batch)
        if batch.ended:
            return batch
        time.sleep(interval_s)


def follow(client: Client, batch_id: str, console: Console, interval_s: float = 1.0) -> Batch:
    """Show the batch's progress until it ends; returns it as it ended."""
    estimate = Estimate()
    if not console.is_terminal:
        shown: list[tuple[str, Counts]] = []

        def print_changes(batch: Batch) -> None:
            c = batch.request_counts
            estimate.add(time.monotonic(), c.completed + c.failed)
            if not shown or shown[-1] != (batch.status, c):
                console.print(line(batch, estimate), markup=False, highlight=False)
                shown.append((batch.status, c))

        return poll(client, batch_id, interval_s, console, print_changes)
    columns = (
        TextColumn("[bold]{task.fields[status]:<11}"),
        BarColumn(bar_width=40),
        TextColumn("[green]{task.fields[done]}[/]/{task.fields[count]} completed"),
        TextColumn("[red]{task.fields[failed]}[/] failed"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("ETA {task.fields[eta]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, refresh_per_second=4) as progress:
        task = progress.add_task(batch_id, total=None, status="", done=0, count=0, failed=0, rate="", eta="")  # fmt: skip

        def update_bar(batch: Batch) -> None:
            c = batch.request_counts
            estimate.add(time.monotonic(), c.completed + c.failed)
            progress.update(
                task, completed=c.completed + c.failed, total=c.total or None,
                status=batch.status.replace("_", " "), done=c.completed, count=c.total,
                failed=c.failed, rate=rate_text(estimate.rate()), eta=clock(estimate.eta_s(c.total)),
            )  # fmt: skip

        return poll(client, batch_id, interval_s, console, update_bar)
