"""Applies the SQL migrations in ``projections/migrations`` once each, in name order."""

from __future__ import annotations

import asyncio
import sys
from importlib import resources

import asyncpg

_LOCK_KEY = 0x43414E4E  # serialises concurrent migrators (API and projector starting together)


async def migrate(dsn: str) -> list[str]:
    """Apply pending migrations; returns the names applied."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        scripts = sorted(
            (
                f
                for f in resources.files("projections.migrations").iterdir()
                if f.name.endswith(".sql")
            ),
            key=lambda f: f.name,
        )
        applied = []
        for script in scripts:
            if script.name in done:
                continue
            async with conn.transaction():
                await conn.execute(script.read_text())
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", script.name)
            applied.append(script.name)
        return applied
    finally:
        await conn.close()


if __name__ == "__main__":
    print(asyncio.run(migrate(sys.argv[1])))
