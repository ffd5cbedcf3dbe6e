"""User commands (``cannonade batch …``, ``cannonade keys …``): they talk to the HTTP API with
an API key, like any client, so they work against a remote deployment.

Data goes to stdout (batch ids, paths of downloaded files, listings); progress and notes go
to stderr. ``batch watch`` and ``batch submit --watch`` exit 0 when the batch completed, 3 when
it ended otherwise (failed, expired, cancelled), 130 when interrupted (the batch goes on)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # the HTTP client is imported when a user command runs, not by workers
    from cannonade.api_client import Batch, Client

EXIT_NOT_COMPLETED = 3
EXIT_INTERRUPTED = 130
# The listing's filters (the API's): `cancelled` takes in the batches still cancelling.
BATCH_STATUSES = ("in_progress", "completed", "failed", "cancelled", "expired")

# Listings print the API's objects as they came, every field of each, with --json.
json_option = click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")


def with_client(command: Callable[..., Any]) -> Callable[..., Any]:
    """Adds ``--api-url``/``--api-key`` and calls the command with a :class:`Client` first;
    an error answer from the API ends the command with its message."""

    @click.option("--api-url", envvar="CANNONADE_API_URL", default="http://127.0.0.1:8080", show_default=True, show_envvar=True, help="The API's address (with or without /v1).")  # fmt: skip
    @click.option("--api-key", envvar="CANNONADE_API_KEY", required=True, show_envvar=True, help="Your API key.")  # fmt: skip
    @functools.wraps(command)
    def run(api_url: str, api_key: str, **kwargs: Any) -> Any:
        from cannonade.api_client import Client, ClientError

        try:
            with Client(api_url, api_key) as client:
                return command(client, **kwargs)
        except ClientError as exc:
            raise click.ClickException(str(exc)) from None

    return run


def note(text: str) -> None:
    click.echo(text, err=True)


def when(unix: int | float | None) -> str:
    """A time as every listing shows it: UTC, marked so, whatever the machine's zone (the API
    and the admin's listings agree on it)."""
    if unix is None:
        return "-"
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def parse_metadata(pairs: tuple[str, ...]) -> dict[str, str] | None:
    metadata = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--metadata")
        metadata[key] = value
    return metadata or None


def follow_and_finish(client: Client, batch_id: str, output: Path | None, interval_s: float) -> None:  # fmt: skip
    """Watch until the batch ends, download its results into ``output`` (if given) and exit
    with the outcome's status."""
    from rich.console import Console

    from cannonade.watch import follow

    if output is not None:
        output_dir(output)  # before the wait: a bad path found once the batch ended costs it
    try:
        batch = follow(client, batch_id, Console(stderr=True), interval_s)
    except KeyboardInterrupt:
        note(f"stopped watching; the batch goes on (cannonade batch watch {batch_id})")
        raise SystemExit(EXIT_INTERRUPTED) from None
    c = batch.request_counts
    note(f"batch {batch.id} {batch.status}: {c.completed} completed, {c.failed} failed of {c.total}")  # fmt: skip
    for error in batch.errors.data if batch.errors else []:
        note(f"  {error.message}")
    if output is not None:
        download_results(client, batch, output)
    if batch.status != "completed":
        raise SystemExit(EXIT_NOT_COMPLETED)


def output_dir(output: Path) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.ClickException(f"cannot write results into {output}: {exc}") from None


def download_results(client: Client, batch: Batch, output: Path) -> None:
    """Write the batch's output and error files into ``output`` as output.jsonl and
    errors.jsonl; prints each path."""
    output_dir(output)
    if not batch.ended:
        note(f"batch {batch.id} is {batch.status}: the files hold the results so far")
    files = ((batch.output_file_id, "output.jsonl"), (batch.error_file_id, "errors.jsonl"))
    if not any(file_id for file_id, _ in files):
        note(f"batch {batch.id} has no output or error file yet")
    for file_id, name in files:
        if file_id is None:
            continue
        dest = output / name
        lines = client.download(file_id, dest)
        note(f"wrote {dest} ({lines} lines)")
        click.echo(dest)


@click.group()
def batch() -> None:
    """Batches: submit a JSONL file, follow it, download its results (over the HTTP API)."""


@batch.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--endpoint", default="/v1/chat/completions", show_default=True, help="The url every line of the file names.")  # fmt: skip
@click.option("--window", "completion_window", default="24h", show_default=True, help="Completion window.")  # fmt: skip
@click.option("--metadata", "metadata_pairs", multiple=True, metavar="KEY=VALUE", help="Batch metadata (repeatable).")  # fmt: skip
@click.option("--watch", is_flag=True, help="Show progress until the batch ends, then download its results.")  # fmt: skip
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None, help="Where --watch puts output.jsonl and errors.jsonl [default: ./<batch id>].")  # fmt: skip
@click.option("--interval", "interval_s", default=1.0, show_default=True, help="Seconds between progress polls.")  # fmt: skip
@with_client
def submit(
    client: Client,
    file: Path,
    endpoint: str,
    completion_window: str,
    metadata_pairs: tuple[str, ...],
    watch: bool,
    output: Path | None,
    interval_s: float,
) -> None:
    """Upload FILE (JSONL, one request per line) and create a batch of it; prints its id."""
    metadata = parse_metadata(metadata_pairs)
    file_id = client.upload(file)
    note(f"uploaded {file} as {file_id}")
    created = client.create_batch(file_id, endpoint, completion_window, metadata)
    click.echo(created.id)
    if watch:
        follow_and_finish(client, created.id, output or Path(created.id), interval_s)


@batch.command("watch")
@click.argument("batch_id")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None, help="Download output.jsonl and errors.jsonl here once it ends.")  # fmt: skip
@click.option("--interval", "interval_s", default=1.0, show_default=True, help="Seconds between progress polls.")  # fmt: skip
@with_client
def watch(client: Client, batch_id: str, output: Path | None, interval_s: float) -> None:
    """Show a batch's progress until it ends."""
    follow_and_finish(client, batch_id, output, interval_s)


@batch.command("download")
@click.argument("batch_id")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None, help="Directory for output.jsonl and errors.jsonl [default: ./<batch id>].")  # fmt: skip
@with_client
def download(client: Client, batch_id: str, output: Path | None) -> None:
    """Download a batch's output and error files (so far, while it runs)."""
    download_results(client, client.batch(batch_id), output or Path(batch_id))


@batch.command("cancel")
@click.argument("batch_id")
@with_client
def cancel(client: Client, batch_id: str) -> None:
    """Cancel a batch: what has not been sent will not be; what is in flight is aborted."""
    cancelled = client.cancel(batch_id)
    c = cancelled.request_counts
    click.echo(f"{cancelled.id} {cancelled.status} ({c.completed} completed, {c.failed} failed of {c.total})")  # fmt: skip


@batch.command("list")
@click.option("--status", type=click.Choice(BATCH_STATUSES), default=None)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 100))
@json_option
@with_client
def list_batches(client: Client, status: str | None, limit: int, as_json: bool) -> None:
    """List your batches, newest first."""
    import msgspec

    from cannonade.api_client import as_batch

    found, more = client.batches(limit, status)
    for answered in found:
        if as_json:  # the API's object as it came, every field of it
            click.echo(msgspec.json.encode(answered))
            continue
        b = as_batch(answered)
        c = b.request_counts
        meta = "" if not b.metadata else "  " + json.dumps(b.metadata, ensure_ascii=False)
        click.echo(
            f"{b.id}  {b.status:<11} {c.completed:>7}/{c.total:<7} failed {c.failed:<6}"
            f" {b.completion_window:<4} {when(b.created_at)}  {b.endpoint}{meta}"
        )
    if more:
        note(f"(more than {limit}; use --limit)")


@click.group()
def keys() -> None:
    """Your API keys, over the HTTP API (operators issue keys: cannonade admin keys create)."""


@keys.command("list")
@json_option
@with_client
def keys_list(client: Client, as_json: bool) -> None:
    """List your API keys (ids and times; secrets are never shown again)."""
    import msgspec

    from cannonade.api_client import Key

    for answered in client.keys():
        if as_json:  # the API's object as it came, every field of it
            click.echo(msgspec.json.encode(answered))
            continue
        key = msgspec.convert(answered, Key)
        state = "active" if key.revoked_at is None else f"revoked {when(key.revoked_at)}"
        current = "  (this key)" if key.current else ""
        click.echo(f"{key.id}  created {when(key.created_at)}  {state}{current}")


@keys.command("revoke")
@click.argument("key_id")
@with_client
def keys_revoke(client: Client, key_id: str) -> None:
    """Revoke one of your API keys; it stops working at once."""
    key = client.revoke_key(key_id)
    click.echo(f"revoked {key.id}")
    if key.current:
        note("that was the key this command used: it no longer works")
