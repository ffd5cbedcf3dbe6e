"""A private PostgreSQL 15 cluster for the local stack and the tests.

The server refuses to run as root, so when we are root the cluster belongs to the
``postgres`` OS user and initdb/pg_ctl run through ``runuser``. The cluster lives in
``<run_dir>/pg`` and is thrown away with the run dir; :func:`start` and :func:`restart` on an
existing cluster keep its data.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

PG_BIN = Path(os.environ.get("CANNONADE_PG_BIN", "/usr/lib/postgresql/15/bin"))
DATABASE = "cannonade"
_PG_USER = "postgres"
# Unix socket paths are limited to 107 bytes; the socket file is "<dir>/.s.PGSQL.<port>".
_MAX_SOCKET_DIR = 90


@dataclass(frozen=True)
class PgCluster:
    """A started cluster: what a stack records about it."""

    pid: int
    port: int
    pg_dir: Path  # the real directory (may be outside run_dir, see _cluster_dir)

    @property
    def admin_dsn(self) -> str:
        return dsn(self.port, "postgres")

    @property
    def database_url(self) -> str:
        return dsn(self.port, DATABASE)


def dsn(port: int, database: str) -> str:
    return f"postgresql://{_PG_USER}@127.0.0.1:{port}/{database}"


def _as_root() -> bool:
    return os.geteuid() == 0


def _run_pg(args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run a server binary, as the postgres user when we are root."""
    cmd = [str(PG_BIN / args[0]), *args[1:]]
    if _as_root():
        cmd = ["runuser", "-u", _PG_USER, "--", *cmd]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed (rc={proc.returncode}):\n"
            f"{proc.stdout.decode(errors='replace')}{proc.stderr.decode(errors='replace')}"
        )
    return proc


def _postgres_can_reach(path: Path) -> bool:
    return _run_pg_check(["test", "-x", str(path), "-a", "-w", str(path)])


def _run_pg_check(cmd: list[str]) -> bool:
    return subprocess.run(["runuser", "-u", _PG_USER, "--", *cmd]).returncode == 0


def _chown_postgres(path: Path) -> None:
    shutil.chown(path, _PG_USER, _PG_USER)


def _cluster_dir(run_dir: Path) -> Path:
    """Create ``<run_dir>/pg`` for the cluster and return the directory to use.

    When the postgres user cannot traverse run_dir (pytest's tmp dirs are 0700 root) or the
    socket path would be too long, the cluster goes in a short private dir under /tmp and
    ``<run_dir>/pg`` is a symlink to it, so `down` still finds and removes it.
    """
    link = run_dir / "pg"
    if link.is_symlink():  # made by an earlier start: the cluster lives there
        return link.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    real = link
    if _as_root():
        link.mkdir(exist_ok=True)
        _chown_postgres(link)
        if len(str(link)) > _MAX_SOCKET_DIR or not _postgres_can_reach(link):
            link.rmdir()
            real = Path(tempfile.mkdtemp(prefix="cannonade-pg-", dir="/tmp"))
            _chown_postgres(real)
            link.symlink_to(real, target_is_directory=True)
    else:
        link.mkdir(exist_ok=True)
        if len(str(link)) > _MAX_SOCKET_DIR:
            link.rmdir()
            real = Path(tempfile.mkdtemp(prefix="cannonade-pg-", dir="/tmp"))
            link.symlink_to(real, target_is_directory=True)
    return real


def _postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


def has_data(run_dir: Path) -> bool:
    """True once initdb has created the cluster of run_dir."""
    return ((run_dir / "pg").resolve() / "data" / "PG_VERSION").is_file()


def _server_opts(pg_dir: Path, port: int) -> str:
    # fsync/synchronous_commit/full_page_writes off: a throwaway dev/test cluster trades
    # crash safety for speed. Never use these settings for data that matters.
    return (
        f"-p {port} -k {pg_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    )


def start(run_dir: Path, port: int) -> PgCluster:
    """Start the cluster of run_dir on 127.0.0.1:port, creating it first if needed (blocking,
    ~1-2 s). Existing data is kept; a cluster already running is left alone."""
    pg_dir = _cluster_dir(run_dir)
    data = pg_dir / "data"
    if not (data / "PG_VERSION").exists():
        _run_pg(
            ["initdb", "-D", str(data), "-A", "trust", "-U", _PG_USER, "-E", "UTF8", "--no-sync"]
        )
    # pg_ctl status: 0 = running (exit codes documented by pg_ctl).
    if _run_pg(["pg_ctl", "-D", str(data), "status"], check=False).returncode != 0:
        _run_pg(
            ["pg_ctl", "-D", str(data), "-o", _server_opts(pg_dir, port)]
            + ["-l", str(pg_dir / "log"), "-w", "start"]
        )
    return PgCluster(_postmaster_pid(data), port, pg_dir)


def restart(run_dir: Path, port: int) -> PgCluster:
    """pg_ctl restart (fast shutdown) the cluster of run_dir on its data and port; starts it
    if it was down or killed. Returns once it accepts connections."""
    pg_dir = (run_dir / "pg").resolve()
    data = pg_dir / "data"
    _run_pg(
        ["pg_ctl", "-D", str(data), "-o", _server_opts(pg_dir, port), "-l", str(pg_dir / "log")]
        + ["-m", "fast", "-w", "restart"]
    )
    return PgCluster(_postmaster_pid(data), port, pg_dir)


def stop(run_dir: Path) -> None:
    """pg_ctl stop -m fast the cluster of run_dir (no-op if none is running)."""
    # Resolve here (as root): the postgres user may not be able to traverse run_dir.
    data = (run_dir / "pg").resolve() / "data"
    if (data / "postmaster.pid").exists():
        _run_pg(["pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"], check=False)


def remove(run_dir: Path) -> None:
    """Delete the cluster's files, including a /tmp target behind a ``pg`` symlink."""
    link = run_dir / "pg"
    if link.is_symlink():
        shutil.rmtree(link.resolve(), ignore_errors=True)
        link.unlink()
    elif link.exists():
        shutil.rmtree(link, ignore_errors=True)


async def wait_ready(dsn_: str, ceiling_s: float = 60.0) -> None:
    """Wait until a connection succeeds (for external servers, e.g. under docker compose)."""
    deadline = time.monotonic() + ceiling_s
    while True:
        try:
            conn = await asyncpg.connect(dsn_, timeout=5)
        except (TimeoutError, OSError, asyncpg.PostgresError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
        else:
            await conn.close()
            return


async def migrate(database_url: str) -> None:
    # Imported lazily: the migrations belong to the projections package.
    from projections.migrate import migrate as apply_migrations

    await apply_migrations(database_url)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _with_database(admin_dsn: str, name: str) -> str:
    base = admin_dsn.split("?", 1)
    head = base[0].rsplit("/", 1)[0]
    return f"{head}/{name}" + (f"?{base[1]}" if len(base) > 1 else "")


async def create_database(admin_dsn: str, name: str, *, migrate_schema: bool = True) -> str:
    """Create database ``name`` (dropping a leftover of that name) and return its DSN.

    Tests use one per session or module so runs never see each other's rows.
    """
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {_quote_ident(name)}")
    finally:
        await conn.close()
    url = _with_database(admin_dsn, name)
    if migrate_schema:
        await migrate(url)
    return url


async def drop_database(admin_dsn: str, name: str) -> None:
    """Drop database ``name``, disconnecting its sessions (FORCE)."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()


async def ensure_database(admin_dsn: str, name: str = DATABASE) -> str:
    """Create ``name`` if missing (keeping its data) and return its DSN."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f"CREATE DATABASE {_quote_ident(name)}")
    finally:
        await conn.close()
    return _with_database(admin_dsn, name)
