"""The API's health and metrics, on its own port: ``/livez``, ``/readyz`` (PostgreSQL, which
every read needs, and Kafka, which every write needs, both answer) and ``/metrics``; the
request timing middleware is :func:`projections.metrics.http_metrics`."""

from __future__ import annotations

from aiohttp import web

from cannonade import health
from cannonade.config import Config


def setup(app: web.Application, config: Config) -> None:
    readiness = health.Readiness()
    postgres, kafka = health.PostgresCheck(config.database_url), health.KafkaCheck(config.kafka)
    readiness.add("postgres", postgres, postgres.close)
    readiness.add("kafka", kafka, kafka.close)
    health.add_routes(app.router, readiness, public=True)

    async def close(_: web.Application) -> None:
        await readiness.close()

    app.on_cleanup.append(close)
