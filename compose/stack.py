"""The no-Docker local stack: one Kafka broker and one PostgreSQL cluster on loopback.

    python -m compose.stack up [--run-dir DIR]     # start, resume or reuse; DIR/stack.json
    python -m compose.stack env [--run-dir DIR]    # export CANNONADE_KAFKA=... lines
    python -m compose.stack stop|start|restart kafka|postgres [--run-dir DIR]
    python -m compose.stack down [--run-dir DIR]   # stop both and delete DIR (and the data)
    python -m compose.stack init|create-topics|migrate   # against external services, from
                                                   # CANNONADE_KAFKA / CANNONADE_DATABASE_URL

Free ports are picked per stack, so a developer's stack and CI's can run side by side.
Everything a stack writes stays under its run dir (default ``.run/stack`` in the repo).

Data survives everything but `down`. `stop`/`start`/`restart` act on one server of a recorded
stack and keep its data and its port, so clients reconnect to the same address (`start` and
`restart` return once the server is ready; the same from Python: :func:`stop_kafka`,
:func:`start_kafka`, :func:`restart_kafka`, :func:`stop_postgres`, :func:`start_postgres`,
:func:`restart_postgres`). `up` on a run dir whose servers died or were stopped (after a
reboot, a kill, a `stop`) starts them again on their data and ports; only a run dir without a
recorded stack (an `up` that failed part way) is wiped and started afresh.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from compose import kafka, postgres

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RUN_DIR = REPO / ".run" / "stack"
STACK_FILE = "stack.json"
# What a directory must contain for `down` to delete it: never rmtree a mistyped --run-dir.
_STACK_MARKERS = (STACK_FILE, "kafka", "pg")
T = TypeVar("T")


@dataclass
class StackInfo:
    kafka_bootstrap: str
    database_url: str
    run_dir: Path
    pids: dict[str, int] = field(default_factory=dict)
    admin_database_url: str = ""  # the cluster's `postgres` DB, for create_database()
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "kafka_bootstrap": self.kafka_bootstrap,
            "database_url": self.database_url,
            "admin_database_url": self.admin_database_url,
            "pids": self.pids,
            "run_dir": str(self.run_dir),
            "timings": self.timings,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> StackInfo:
        pids = data.get("pids") or {}
        timings = data.get("timings") or {}
        if not isinstance(pids, dict) or not isinstance(timings, dict):
            raise ValueError("stack.json: pids and timings must be objects")
        return cls(
            kafka_bootstrap=str(data["kafka_bootstrap"]),
            database_url=str(data["database_url"]),
            run_dir=Path(str(data["run_dir"])),
            pids={str(k): int(v) for k, v in pids.items()},
            admin_database_url=str(data.get("admin_database_url", "")),
            timings={str(k): float(v) for k, v in timings.items()},
        )


def load(run_dir: Path) -> StackInfo | None:
    """The stack recorded in run_dir, or None (missing or unreadable stack.json)."""
    try:
        return StackInfo.from_json(json.loads((run_dir / STACK_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(info: StackInfo) -> None:
    tmp = info.run_dir / f".{STACK_FILE}.tmp"
    tmp.write_text(json.dumps(info.to_json(), indent=2) + "\n")
    os.replace(tmp, info.run_dir / STACK_FILE)  # readers never see a half-written file


def _port(address: str) -> int:
    """The port of host:port or of a postgresql:// URL."""
    return int(address.rsplit("@", 1)[-1].rsplit(":", 1)[1].split("/", 1)[0])


def is_alive(info: StackInfo) -> bool:
    """Both processes of a recorded stack are running and accepting connections."""
    kafka_pid = info.pids.get("kafka")
    pg_pid = info.pids.get("postgres")
    return (
        kafka_pid is not None
        and pg_pid is not None
        and kafka.is_running(kafka_pid, info.run_dir / "kafka")
        and kafka.is_running(pg_pid)  # generic pid check; the port check below confirms
        and kafka.port_open(_port(info.kafka_bootstrap))
        and kafka.port_open(_port(info.database_url))
    )


def _lock_path(run_dir: Path) -> Path:
    # Beside the run dir, not in it: `down` deletes the run dir while holding the lock.
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return run_dir.parent / f".{run_dir.name}.lock"


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Serialise up/down on one run dir across processes and event loops."""
    with _lock_path(run_dir).open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.asynccontextmanager
async def _alocked(run_dir: Path) -> AsyncIterator[None]:
    """_locked for coroutines: polls so the event loop is never blocked on the lock."""
    with _lock_path(run_dir).open("w") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


async def _start_kafka(run_dir: Path, ports: tuple[int, int] | None) -> kafka.KafkaNode:
    """Start (or find running) the broker of run_dir and wait until it serves requests."""
    kafka_dir = run_dir / "kafka"
    # format + spawn block (java runs StorageTool): keep them off the event loop so that
    # PostgreSQL starts meanwhile.
    node = await asyncio.to_thread(kafka.start, kafka_dir, None, ports)
    await kafka.wait_ready(node.bootstrap, node.pid, kafka_dir / "kafka.log")
    return node


async def _start_postgres(run_dir: Path, port: int) -> postgres.PgCluster:
    cluster = await asyncio.to_thread(postgres.start, run_dir, port)
    await postgres.ensure_database(cluster.admin_dsn)
    await postgres.migrate(cluster.database_url)
    return cluster


async def _timed(aw: Awaitable[T]) -> tuple[T, float]:
    t0 = time.monotonic()
    result = await aw
    return result, time.monotonic() - t0


async def up(run_dir: Path = DEFAULT_RUN_DIR) -> StackInfo:
    """Start Kafka + PostgreSQL under run_dir, create the topics, migrate; reuse a live stack.

    Idempotent: a run dir whose recorded processes are alive is reused; one whose processes
    died or were stopped is resumed on its data and ports (only the dead ones are started);
    anything else is cleaned and started afresh. Topics and migrations are always re-applied
    (both idempotent).
    """
    run_dir = await asyncio.to_thread(lambda: run_dir.expanduser().resolve())
    async with _alocked(run_dir):
        return await _up_locked(run_dir)


def _resumable_or_clean(run_dir: Path) -> StackInfo | None:
    """The stack recorded in run_dir if its data is all there, else None after clearing any
    leftovers (an `up` that failed before recording its stack)."""
    existing = load(run_dir)
    if existing is not None and kafka.formatted(run_dir / "kafka") and postgres.has_data(run_dir):
        return existing
    _down_unlocked(run_dir)
    run_dir.mkdir(parents=True)
    return None


async def _up_locked(run_dir: Path) -> StackInfo:
    t0 = time.monotonic()
    existing = await asyncio.to_thread(_resumable_or_clean, run_dir)
    if existing is not None and is_alive(existing):
        await kafka.create_topics(existing.kafka_bootstrap)
        await postgres.migrate(existing.database_url)
        existing.timings = {"reused": round(time.monotonic() - t0, 2)}
        return existing
    kafka_ports: tuple[int, int] | None
    if existing is not None:  # the broker's ports are in its node dir
        kafka_ports, pg_port = None, _port(existing.database_url)
    else:
        kafka_port, controller_port, pg_port = kafka.free_ports(3)
        kafka_ports = (kafka_port, controller_port)
    try:
        # Both run to completion even if one fails (no fail-fast): a half-finished start in a
        # worker thread could otherwise spawn a process after the cleanup below.
        kafka_res, pg_res = await asyncio.gather(
            _timed(_start_kafka(run_dir, kafka_ports)),
            _timed(_start_postgres(run_dir, pg_port)),
            return_exceptions=True,
        )
        for res in (kafka_res, pg_res):
            if isinstance(res, BaseException):
                raise res
        assert not isinstance(kafka_res, BaseException)
        assert not isinstance(pg_res, BaseException)
        (node, t_kafka), (cluster, t_pg) = kafka_res, pg_res
        _, t_topics = await _timed(kafka.create_topics(node.bootstrap))
    except BaseException:
        # Stop what did start but keep run_dir (logs, data) for inspection; the next `up`
        # resumes a recorded stack and cleans anything else.
        await asyncio.to_thread(_stop_processes, run_dir)
        raise
    timings = {
        "kafka": round(t_kafka, 2),
        "topics": round(t_topics, 2),
        "postgres": round(t_pg, 2),
        "total": round(time.monotonic() - t0, 2),
    }
    if existing is not None:
        timings["resumed"] = timings["total"]
    info = StackInfo(
        kafka_bootstrap=node.bootstrap,
        database_url=cluster.database_url,
        run_dir=run_dir,
        pids={"kafka": node.pid, "postgres": cluster.pid},
        admin_database_url=cluster.admin_dsn,
        timings=timings,
    )
    await asyncio.to_thread(_write, info)
    return info


@contextlib.asynccontextmanager
async def _recorded(run_dir: Path) -> AsyncIterator[StackInfo]:
    """The recorded stack of run_dir, locked; its pids are saved again on exit."""
    run_dir = await asyncio.to_thread(lambda: run_dir.expanduser().resolve())
    async with _alocked(run_dir):
        info = await asyncio.to_thread(load, run_dir)
        if info is None:
            raise RuntimeError(f"no stack in {run_dir}: run `python -m compose.stack up`")
        yield info
        await asyncio.to_thread(_write, info)


async def stop_kafka(run_dir: Path = DEFAULT_RUN_DIR) -> StackInfo:
    """Stop the broker (clean shutdown), keeping its data, ports and cluster id."""
    async with _recorded(run_dir) as info:
        await asyncio.to_thread(kafka.stop, info.run_dir / "kafka")
    return info


async def _resume_kafka(info: StackInfo) -> None:
    node = await _start_kafka(info.run_dir, None)
    # Ready means serving the topics: a restarted broker answers before it leads them again.
    await kafka.create_topics(node.bootstrap)
    info.pids["kafka"] = node.pid


async def start_kafka(run_dir: Path = DEFAULT_RUN_DIR) -> StackInfo:
    """Start the broker on its data and ports (a no-op if running); returns once every
    catalog partition has a leader."""
    async with _recorded(run_dir) as info:
        await _resume_kafka(info)
    return info


async def restart_kafka(run_dir: Path = DEFAULT_RUN_DIR) -> StackInfo:
    """stop_kafka then start_kafka: clients see the same address, topics and records."""
    async with _recorded(run_dir) as info:
        await asyncio.to_thread(kafka.stop, info.run_dir / "kafka")
        await _resume_kafka(info)
    return info


async def stop_postgres(run_dir: Path = DEFAULT_RUN_DIR) -> StackInfo:
    """pg_ctl stop -m fast, keeping the data."""
    async with _recorded(run_dir) as info:
        await asyncio.to_thread(postgres.stop, info.run_dir)
    return info


async def start_postgres(run_dir: Path = DEFAULT_RUN_DIR) -> StackInfo:
    """Start PostgreSQL on its data and port (a no-op if running); returns once it accepts
    connections."""
    async with _recorded(run_dir) as info:
        cluster = await asyncio.to_thread(postgres.start, info.run_dir, _port(info.database_url))
        info.pids["postgres"] = cluster.pid
    return info


async def restart_postgres(run_dir: Path = DEFAULT_RUN_DIR) -> StackInfo:
    """pg_ctl restart on the same data and port; returns once it accepts connections."""
    async with _recorded(run_dir) as info:
        cluster = await asyncio.to_thread(postgres.restart, info.run_dir, _port(info.database_url))
        info.pids["postgres"] = cluster.pid
    return info


def _stop_processes(run_dir: Path) -> None:
    kafka.stop(run_dir / "kafka")
    postgres.stop(run_dir)


def _down_unlocked(run_dir: Path) -> None:
    if not run_dir.exists():
        return
    if any(run_dir.iterdir()) and not any((run_dir / m).exists() for m in _STACK_MARKERS):
        raise RuntimeError(f"{run_dir} does not look like a stack run dir; not deleting it")
    _stop_processes(run_dir)
    postgres.remove(run_dir)
    shutil.rmtree(run_dir)


def down(run_dir: Path = DEFAULT_RUN_DIR) -> None:
    """Stop the stack of run_dir (pg_ctl stop -m fast; SIGTERM, then SIGKILL, the broker's
    process group) and delete run_dir. A no-op when run_dir does not exist."""
    run_dir = run_dir.expanduser().resolve()
    with _locked(run_dir):
        _down_unlocked(run_dir)


async def init_external(
    bootstrap: str | None, database_url: str | None, ceiling_s: float = 120.0
) -> None:
    """Create topics and/or migrate against services started elsewhere (docker compose)."""
    if bootstrap:
        await kafka.wait_ready(bootstrap, ceiling_s=ceiling_s)
        created = await kafka.create_topics(bootstrap)
        print(f"topics: created {len(created)} ({', '.join(created) or 'all existed'})")
    if database_url:
        await postgres.wait_ready(database_url, ceiling_s=ceiling_s)
        await postgres.migrate(database_url)
        print("database: migrated")


def _env_lines(info: StackInfo) -> str:
    return (
        f"export CANNONADE_KAFKA={shlex.quote(info.kafka_bootstrap)}\n"
        f"export CANNONADE_DATABASE_URL={shlex.quote(info.database_url)}"
    )


_SERVER_ACTIONS: dict[str, dict[str, Callable[[Path], Coroutine[Any, Any, StackInfo]]]] = {
    "stop": {"kafka": stop_kafka, "postgres": stop_postgres},
    "start": {"kafka": start_kafka, "postgres": start_postgres},
    "restart": {"kafka": restart_kafka, "postgres": restart_postgres},
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m compose.stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, help_ in (
        ("up", "start, resume on its data, or reuse the stack"),
        ("down", "stop it, delete run dir"),
        ("env", "print export lines for the stack"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    for name in _SERVER_ACTIONS:
        p = sub.add_parser(name, help=f"{name} one server, keeping its data and port")
        p.add_argument("server", choices=("kafka", "postgres"))
        p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    for name, help_ in (
        ("create-topics", "create the catalog's topics"),
        ("migrate", "apply SQL migrations"),
        ("init", "create-topics then migrate"),
    ):
        p = sub.add_parser(name, help=help_ + " (external services)")
        p.add_argument("--kafka", default=os.environ.get("CANNONADE_KAFKA"))
        p.add_argument("--database-url", default=os.environ.get("CANNONADE_DATABASE_URL"))
    args = parser.parse_args(argv)

    if args.cmd == "up":
        info = asyncio.run(up(args.run_dir))
        t = info.timings
        if "reused" in t:
            print(f"stack: reused running stack in {info.run_dir} ({t['reused']:.2f}s)")
        else:
            how = "resumed on its data" if "resumed" in t else "up"
            print(
                f"stack {how}: kafka {t['kafka']:.2f}s (+ topics {t['topics']:.2f}s), "
                f"postgres {t['postgres']:.2f}s (incl. migrate), total {t['total']:.2f}s"
            )
        print(f"  kafka {info.kafka_bootstrap}  database {info.database_url}")
        print(f"  {info.run_dir / STACK_FILE}")
    elif args.cmd == "down":
        t0 = time.monotonic()
        existed = args.run_dir.exists()
        down(args.run_dir)
        what = f"{args.run_dir} removed" if existed else f"no stack in {args.run_dir}"
        print(f"stack down in {time.monotonic() - t0:.2f}s ({what})")
    elif args.cmd in _SERVER_ACTIONS:
        t0 = time.monotonic()
        info = asyncio.run(_SERVER_ACTIONS[args.cmd][args.server](args.run_dir))
        where = info.kafka_bootstrap if args.server == "kafka" else info.database_url
        print(f"{args.server} {args.cmd} done in {time.monotonic() - t0:.2f}s ({where})")
    elif args.cmd == "env":
        found = load(args.run_dir.expanduser().resolve())
        if found is None:
            print(f"no stack in {args.run_dir}: run `python -m compose.stack up`", file=sys.stderr)
            return 1
        print(_env_lines(found))
    else:
        need_kafka = args.cmd in ("create-topics", "init")
        need_db = args.cmd in ("migrate", "init")
        if (need_kafka and not args.kafka) or (need_db and not args.database_url):
            parser.error("set CANNONADE_KAFKA / CANNONADE_DATABASE_URL (or --kafka/--database-url)")
        asyncio.run(
            init_external(
                args.kafka if need_kafka else None, args.database_url if need_db else None
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
