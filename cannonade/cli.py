"""The ``cannonade`` command: run a worker role, the projector or the API; administer keys."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import click

from cannonade import config as config_module


@click.group()
def main() -> None:
    """Cannonade: event-sourced engine for large volumes of LLM requests."""


@main.command()
@click.argument("role", type=click.Choice(["commands", "gate", "executor", "chains"]))
@click.option("--loglevel", default="info")
def worker(role: str, loglevel: str) -> None:
    """Run one stream-processing worker role (a Faust worker)."""
    from streams.worker import run

    run(role, config_module.load(), loglevel)


@main.command()
def projector() -> None:
    """Run the projector: Kafka lifecycle topics into PostgreSQL read models."""
    from projections.projector import Projector

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    cfg = config_module.load()
    asyncio.run(Projector(cfg.database_url, cfg.kafka).run())


@main.command()
def api() -> None:
    """Run the HTTP API."""
    from projections.api.app import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    run(config_module.load())


@main.command()
def migrate() -> None:
    """Apply the database migrations."""
    from projections.migrate import migrate as apply

    applied = asyncio.run(apply(config_module.load().database_url))
    click.echo(f"applied: {', '.join(applied) or 'nothing (up to date)'}")


@main.group()
def keys() -> None:
    """API keys."""


async def _with_keys(action: Any) -> Any:
    """Run ``action(publisher, conn)`` against the configured broker and database."""
    import asyncpg

    from projections.api.publisher import Publisher

    cfg = config_module.load()
    publisher = Publisher(cfg.kafka)
    conn = await asyncpg.connect(cfg.database_url)
    try:
        return await action(publisher, conn)
    finally:
        await conn.close()
        await publisher.stop()


@keys.command("create")
@click.option("--user", required=True, help="The user the key belongs to (created if new).")
def keys_create(user: str) -> None:
    """Create an API key and print its secret (shown once; only its hash is stored)."""
    from projections.api.auth import issue_key

    _, secret = asyncio.run(_with_keys(lambda p, c: issue_key(p, c, user)))
    click.echo(secret)


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke an API key by id (see `cannonade keys list`); it stops working at once."""
    from projections.api.auth import revoke_key

    if not asyncio.run(_with_keys(lambda p, c: revoke_key(p, c, key_id))):
        raise click.ClickException(f"no API key with id {key_id}")
    click.echo(f"revoked {key_id}")


@keys.command("list")
@click.option("--user", default=None, help="Only this user's keys.")
def keys_list(user: str | None) -> None:
    """List API keys (ids, owners, creation and revocation times; never secrets)."""
    from projections.api.auth import list_keys

    async def go(_: Any, conn: Any) -> Any:
        return await list_keys(conn, user)

    for key in asyncio.run(_with_keys(go)):
        revoked = "" if key.revoked_at is None else f"  revoked {key.revoked_at:%Y-%m-%d %H:%M}"
        click.echo(f"{key.id}  {key.user:<24} created {key.created_at:%Y-%m-%d %H:%M}{revoked}")


@main.group()
def models() -> None:
    """Model liveness (the model-filters log)."""


@models.command("set-state")
@click.argument("model")
@click.argument("state", type=click.Choice(["live", "coming", "absent", "leaving"]))
@click.option(
    "--expected-ready-at", type=click.DateTime(), default=None, help="ETA for 'coming' (UTC)."
)
def models_set_state(model: str, state: str, expected_ready_at: datetime | None) -> None:
    """Publish a model's liveness; the claim gate applies it at once."""
    from aiokafka import AIOKafkaProducer

    from schemas import codec, ids, topics
    from schemas.events import ModelFilterAppended

    event = ModelFilterAppended(
        event_id=ids.new_id(),
        occurred_at=datetime.now(UTC),
        model=model,
        state=state,  # type: ignore[arg-type]
        expected_ready_at=None
        if expected_ready_at is None
        else expected_ready_at.replace(tzinfo=UTC),
    )

    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=config_module.load().kafka, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(
                topics.MODEL_FILTERS.name, key=model.encode(), value=codec.encode(event)
            )
        finally:
            await producer.stop()

    asyncio.run(go())
    click.echo(f"{model}: {state}")


@main.command("pending-counts")
@click.option(
    "--window",
    "windows",
    multiple=True,
    required=True,
    metavar="LABEL:START:END",
    help="Deadline window in seconds from now; empty START = no lower bound (overdue).",
)
@click.option(
    "--state",
    "states",
    multiple=True,
    default=("pending", "claimed", "processing"),
    show_default=True,
)
@click.option("--model", "models", multiple=True)
@click.option(
    "--decay-s",
    type=float,
    default=None,
    help="Priority decay window (adds recent flex completions to '1h').",
)
def pending_counts_cmd(
    windows: tuple[str, ...],
    states: tuple[str, ...],
    models: tuple[str, ...],
    decay_s: float | None,
) -> None:
    """Pending request counts by model and deadline window (JSON), as capacity admission reads them."""
    import asyncpg
    import msgspec

    from projections.pending_counts import Window, pending_counts

    parsed = []
    for spec in windows:
        label, start, end = spec.split(":")
        parsed.append(Window(label, float(start) if start else None, float(end)))

    async def go() -> dict[str, dict[str, int]]:
        conn = await asyncpg.connect(config_module.load().database_url)
        try:
            return await pending_counts(
                conn,
                parsed,
                list(states),
                datetime.now(UTC),
                models=list(models) or None,
                priority_decay_s=decay_s,
            )
        finally:
            await conn.close()

    click.echo(msgspec.json.encode(asyncio.run(go())).decode())


@main.command()
def workers() -> None:
    """List executor workers (daemon records), newest first, with heartbeat age."""
    import asyncpg

    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(config_module.load().database_url)
        try:
            return await conn.fetch(
                "SELECT id, status, requests_processed, requests_failed, requests_in_flight,"
                " extract(epoch FROM now() - last_heartbeat) AS age FROM daemons"
                " ORDER BY created_at DESC"
            )
        finally:
            await conn.close()

    for r in asyncio.run(go()):
        age = "-" if r["age"] is None else f"{float(r['age']):.0f}s ago"
        click.echo(
            f"{r['id']:<48} {r['status']:<8} heartbeat {age:<9} processed {r['requests_processed']}"
            f" failed {r['requests_failed']} in flight {r['requests_in_flight']}"
        )


@main.command()
@click.option("--requests", "count", default=300, show_default=True)
def demo(count: int) -> None:
    """Bring up the local stack and run a demo batch against the fake upstream."""
    from compose.demo import run

    run(count)


if __name__ == "__main__":
    main()
