"""The ``cannonade`` command: run a worker role, the projector or the API; administer keys
(``admin keys``); the user commands (``batch``, ``keys``) are in :mod:`cannonade.cli_user`."""

from __future__ import annotations

import asyncio
import faulthandler
from datetime import UTC, datetime, timedelta
from typing import Any

import click
import uvloop

from cannonade import config as config_module
from cannonade.cli_user import batch, json_option, keys, when


def run() -> None:
    """The process entry point (the ``cannonade`` script, ``python -m cannonade.cli``)."""
    # Every service's loop (Faust's worker, aiohttp's run_app, asyncio.run) comes from this
    # policy: uvloop cut the executor's CPU per request by ~15 % in bench.peer. Set here, per
    # process, not in the group, so that invoking a command in-process leaves the caller's.
    # (Faust's consumer thread makes its own loop on asyncio's: streams/thread_loop.py.)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # A crash in native code (an executor once died of SIGSEGV while stopping) then leaves
    # every thread's Python stack in the service's log, not just the supervisor's "-11".
    faulthandler.enable()
    try:
        main()
    except Exception as exc:
        message = _operational(exc)
        if message is None:
            raise  # a defect: its traceback is what finds it
        click.echo(f"Error: {message}", err=True)
        raise SystemExit(1) from None


def _operational(exc: Exception) -> str | None:
    """What went wrong in operation, in a line: a service that does not answer, a configuration
    that does not load, input the rules refuse. None for anything else."""
    import asyncpg
    from aiokafka.errors import KafkaError

    from schemas.errors import ApiError

    if isinstance(exc, config_module.ConfigError):
        return str(exc)
    if isinstance(exc, ApiError):
        return exc.message
    if isinstance(exc, OSError | asyncpg.PostgresError | asyncpg.InterfaceError | KafkaError):
        return f"{exc} ({type(exc).__name__}): is the broker or the database reachable?"
    return None


def _echo_json(obj: Any) -> None:
    import msgspec

    click.echo(msgspec.json.encode(obj))


def _unix(at: datetime | None) -> int | None:
    """A time as the API's objects give it (whole seconds since the epoch)."""
    return None if at is None else int(at.timestamp())


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


def _process(role: str) -> config_module.Config:
    """The configuration, with this process's logs and metrics set up as ``role``."""
    from cannonade import logs, metrics

    cfg = config_module.load()
    logs.configure(role, cfg.observability.log_format)
    metrics.announce(role)
    return cfg


@main.command()
def projector() -> None:
    """Run the projector: Kafka lifecycle topics into PostgreSQL read models."""
    from projections.projector import serve

    asyncio.run(serve(_process("projector")))


@main.command()
def api() -> None:
    """Run the HTTP API."""
    from projections.api.app import run

    run(_process("api"))


@main.command()
def migrate() -> None:
    """Apply the database migrations."""
    from projections.migrate import migrate as apply

    applied = asyncio.run(apply(config_module.load().database_url))
    click.echo(f"applied: {', '.join(applied) or 'nothing (up to date)'}")


main.add_command(batch)
main.add_command(keys)


@main.group()
def admin() -> None:
    """Operator commands, run where the broker and the database are reachable."""


@admin.group("keys")
def admin_keys() -> None:
    """Any user's API keys, straight on the keys topic and the read model."""


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


@admin_keys.command("create")
@click.option("--user", required=True, help="The user the key belongs to (created if new).")
def keys_create(user: str) -> None:
    """Create an API key and print its secret (shown once; only its hash is stored)."""
    from projections.api.auth import KeyNotShownYet, issue_key

    try:
        _, secret = asyncio.run(_with_keys(lambda p, c: issue_key(p, c, user)))
    except KeyNotShownYet as exc:  # the secret exists nowhere else: print it anyway
        click.echo(exc.secret)
        click.echo(f"warning: {exc}", err=True)
        return
    click.echo(secret)


@admin_keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke an API key by id (see `cannonade admin keys list`); it stops working at once."""
    from projections.api.auth import revoke_key

    if not asyncio.run(_with_keys(lambda p, c: revoke_key(p, c, key_id))):
        raise click.ClickException(f"no API key with id {key_id}")
    click.echo(f"revoked {key_id}")


@admin_keys.command("list")
@click.option("--user", default=None, help="Only this user's keys.")
@json_option
def keys_list(user: str | None, as_json: bool) -> None:
    """List API keys (ids, owners, creation and revocation times; never secrets)."""
    from projections.api.auth import list_keys

    async def go(_: Any, conn: Any) -> Any:
        return await list_keys(conn, user)

    for key in asyncio.run(_with_keys(go)):
        if as_json:  # the API's key object, with its owner
            _echo_json({"id": key.id, "object": "api_key", "user": key.user, "created_at": _unix(key.created_at), "revoked_at": _unix(key.revoked_at)})  # fmt: skip
            continue
        revoked = "" if key.revoked_at is None else f"  revoked {when(key.revoked_at.timestamp())}"
        click.echo(f"{key.id}  {key.user:<24} created {when(key.created_at.timestamp())}{revoked}")


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

    from projections.pending_counts import Window, pending_counts

    parsed = []
    for spec in windows:
        try:
            label, start, end = spec.split(":")
            parsed.append(Window(label, float(start) if start else None, float(end)))
        except ValueError:
            raise click.BadParameter(f"{spec!r} is not LABEL:START:END", param_hint="--window") from None  # fmt: skip

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

    _echo_json(asyncio.run(go()))


@main.command()
@json_option
def workers(as_json: bool) -> None:
    """List executor workers (daemon records), newest first, with heartbeat age."""
    import asyncpg

    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(config_module.load().database_url)
        try:
            return list(
                await conn.fetch(
                    "SELECT id, status, requests_processed, requests_failed, requests_in_flight,"
                    " extract(epoch FROM last_heartbeat)::bigint AS last_heartbeat,"
                    " extract(epoch FROM now() - last_heartbeat) AS age"
                    " FROM daemons ORDER BY created_at DESC"
                )
            )
        finally:
            await conn.close()

    for r in asyncio.run(go()):
        if as_json:
            _echo_json({k: v for k, v in r.items() if k != "age"})
            continue
        age = "-" if r["age"] is None else f"{float(r['age']):.0f}s ago"
        click.echo(
            f"{r['id']:<48} {r['status']:<8} heartbeat {age:<9} processed {r['requests_processed']}"
            f" failed {r['requests_failed']} in flight {r['requests_in_flight']}"
        )


@main.command()
@click.option("--once", is_flag=True, help="Run one purge round now and exit.")
def purge(once: bool) -> None:
    """Run the purge worker: reap rows under deleted batches and files, trim model filters."""
    import signal

    import asyncpg

    from projections import tombstones
    from projections.api.publisher import Publisher
    from projections.purge import Purger, describe, run_once, serve

    cfg = _process("purge")

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        pool = await asyncpg.create_pool(cfg.database_url, min_size=1, max_size=2)
        publisher = Publisher(cfg.kafka)
        purger = Purger(
            pool,
            lambda keys: tombstones.send(publisher, keys),
            lambda uploads: tombstones.abandon(publisher, uploads),
            timedelta(milliseconds=cfg.purge.stale_upload_ms),
        )
        try:
            if once:
                click.echo(f"purged {describe(await run_once(purger, cfg.purge, stop))}")
            else:
                await serve(purger, cfg, stop)
        finally:
            await publisher.stop()
            await pool.close()

    asyncio.run(go())


@main.group()
def users() -> None:
    """Users: right to erasure."""


@users.command("erase")
@click.argument("user")
@click.option("--timeout", "timeout_s", default=300.0, show_default=True, help="Seconds to wait for the read model.")  # fmt: skip
def users_erase(user: str, timeout_s: float) -> None:
    """Erase USER's prompt and completion text from the read model and every topic.

    Deletes their batches (cancelling what runs, clearing metadata), their files and their
    requests without a batch, tombstones every body record of their content, and waits until
    the read model shows it. Repeat until it reports 0; the purge reaps what remains."""
    from projections.erasure import ErasureError, erase

    cfg = config_module.load()

    async def go(publisher: Any, conn: Any) -> Any:
        return await erase(conn, publisher, cfg.kafka, user, timeout_s=timeout_s)

    try:
        report = asyncio.run(_with_keys(go))
    except ErasureError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(report.summary(user))


@main.group()
def webhooks() -> None:
    """Webhook endpoints notified when a user's batch ends."""


@webhooks.command("create")
@click.option("--user", required=True)
@click.option("--url", required=True, help="Where to POST the signed notifications.")
@click.option("--name", default=None)
@click.option("--event-type", "event_types", multiple=True, help="batch.completed, batch.failed, batch.cancelled, batch.expired (default: all).")  # fmt: skip
@click.option("--secret", default=None, help="A whsec_ signing secret to use (default: generated).")  # fmt: skip
def webhooks_create(
    user: str, url: str, name: str | None, event_types: tuple[str, ...], secret: str | None
) -> None:
    """Register an endpoint; prints its id and signing secret (shown once)."""
    from projections import webhooks as registry
    from projections.webhook_signing import SecretBox
    from schemas.api_webhooks import WebhookRegistration
    from schemas.errors import ApiError

    cfg = config_module.load()
    reg = WebhookRegistration(url=url, name=name, event_types=list(event_types) or None, signing_secret=secret)  # fmt: skip

    async def go(publisher: Any, conn: Any) -> Any:
        return await registry.register(publisher, conn, SecretBox(cfg.webhooks.secret_keys), user, reg)  # fmt: skip

    try:
        endpoint = asyncio.run(_with_keys(go))
    except ApiError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(f"{endpoint.id}  {endpoint.url}")
    click.echo(f"signing secret: {endpoint.signing_secret}")


@webhooks.command("new-key")
def webhooks_new_key() -> None:
    """Print a fresh sealing key for ``webhooks.secret_keys`` (base64 of 32 random bytes)."""
    from projections.webhook_signing import new_key

    click.echo(new_key())


@webhooks.command("list")
@click.option("--user", required=True)
@json_option
def webhooks_list(user: str, as_json: bool) -> None:
    """List a user's endpoints (never their secrets)."""
    from projections import webhooks as registry

    async def go(_: Any, conn: Any) -> Any:
        return await registry.list_endpoints(conn, user)

    for e in asyncio.run(_with_keys(go)):
        if as_json:  # the API's endpoint object
            _echo_json(e)
            continue
        click.echo(f"{e.id}  {e.url}  {','.join(e.event_types)}  {e.signing_secret_hint}")  # fmt: skip


@webhooks.command("delete")
@click.argument("webhook_id")
@click.option("--user", required=True)
def webhooks_delete(webhook_id: str, user: str) -> None:
    """Delete one of a user's endpoints; its pending deliveries stop."""
    from projections import webhooks as registry

    async def go(publisher: Any, conn: Any) -> Any:
        return await registry.delete(publisher, conn, user, webhook_id)

    if not asyncio.run(_with_keys(go)):
        raise click.ClickException(f"{user} has no webhook endpoint {webhook_id}")
    click.echo(f"deleted {webhook_id}")


@main.command()
@click.option("--requests", "count", default=300, show_default=True)
def demo(count: int) -> None:
    """Bring up the local stack and run a demo batch against the fake upstream."""
    try:
        from compose.demo import run
    except ModuleNotFoundError as exc:  # the demo drives the stack with the dev extras' SDK
        raise click.ClickException(
            f"the demo needs the development extras ({exc.name} is missing):"
            " pip install 'cannonade[dev]', or run ./compose/demo.sh"
        ) from None
    run(count)


if __name__ == "__main__":
    run()
