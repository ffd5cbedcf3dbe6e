"""Configuration: a TOML file plus environment variables, with documented defaults.

Sources, later wins:
1. the defaults below;
2. the TOML file named by ``CANNONADE_CONFIG`` (if set);
3. environment variables: ``CANNONADE_KAFKA``, ``CANNONADE_DATABASE_URL``, ``CANNONADE_MODELS``
   (a JSON object shaped like the ``[models]`` table), ``CANNONADE_API_HOST``, ``CANNONADE_API_PORT``,
   ``CANNONADE_WEBHOOK_SECRET_KEYS``, ``CANNONADE_METRICS_PORT``, ``CANNONADE_METRICS_HOST``,
   ``CANNONADE_LOG_FORMAT``.

Example file::

    [models.gpt-4o-mini]
    kind = "chat"                       # chat | embeddings
    upstream = "http://127.0.0.1:8001"  # base URL; the request path is appended
    api_key = ""                        # upstream credential, never published on Kafka
    concurrency = 16                    # max requests in flight for this model

    [api]
    port = 8080
    allowed_completion_windows = ["24h", "1h"]
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec

from schemas.types import Window
from streams.execution.outcome import ModelEscalation
from streams.gate.scoring import GateConfig
from streams.responses.tools import ToolConfig

ModelKind = Literal["chat", "embeddings"]


class ModelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: ModelKind = "chat"
    upstream: str = "http://127.0.0.1:8001"
    api_key: str = ""
    concurrency: int = 8
    # Users allowed to use the model; empty means every user.
    users: list[str] = []

    def __post_init__(self) -> None:
        url = urlsplit(self.upstream)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"upstream {self.upstream!r} is not an http(s) URL with a host")
        if url.username is not None or url.password is not None:
            # Error lines and logs name the upstream's address: a credential in it would go
            # to every user whose call failed.
            raise ValueError("upstream must not carry a credential: set the model's api_key")


class ApiConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8080
    # Duration text as the commands contract takes it (`24h`, `90m`): another spelling would
    # pass the API and then be refused by the commands agent.
    allowed_completion_windows: list[Window] = msgspec.field(default_factory=lambda: ["24h", "1h"])
    allowed_url_paths: list[str] = msgspec.field(
        default_factory=lambda: [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/responses",
        ]
    )
    max_file_size: int = 209_715_200
    max_requests_per_file: int = 50_000
    max_request_body_size: int = 10_485_760
    # Read-your-writes: a write waits for its projection while the projector makes progress;
    # it gives up when the projector has not advanced for `projection_stall_s`, or after
    # `projection_wait_s` in any case.
    projection_wait_s: float = 300.0
    projection_stall_s: float = 15.0
    # Concurrent content downloads per user: one user's downloads cannot hold every
    # database connection.
    downloads_per_user: int = 4
    # Users who also see the dashboard's operator views (the whole engine's throughput and
    # latency); everyone else gets 403 there.
    operators: list[str] = []


class ExecutorConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_in_flight: Annotated[int, msgspec.Meta(ge=1)] = 512  # 0 would never call
    first_chunk_timeout_ms: int = 540_000
    chunk_timeout_ms: int = 540_000
    body_timeout_ms: int = 60_000
    backoff_ms: int = 1000
    backoff_factor: float = 2.0
    max_backoff_ms: int = 10_000
    max_retries: int | None = 1000
    stop_before_deadline_ms: int | None = 0
    heartbeat_interval_ms: int = 5000
    # Paths sent as SSE streams (first-chunk and inter-chunk timeouts apply; core §4.4).
    streamable_endpoints: list[str] = msgspec.field(default_factory=list)
    # Batch fields sent upstream as x-fusillade-batch-* headers (core §4.4); other names are
    # looked up in the batch metadata.
    batch_metadata_fields: list[str] = msgspec.field(
        default_factory=lambda: ["id", "endpoint", "created_at", "completion_window"]
    )
    # Post-claim rewrites (core §4.3): nvext.agent_hints.priority from the deadline, and a
    # model swapped for its escalation model close to the deadline.
    inject_deadline_priority: bool = False
    model_escalations: dict[str, ModelEscalation] = {}


class LivenessConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """When the gate takes a claim back (core §4.8); ``processing_timeout_ms`` is also how
    long a chain with steps in flight may hear nothing before their work goes out again."""

    claim_timeout_ms: int = 60_000
    processing_timeout_ms: int = 600_000
    stale_daemon_threshold_ms: int = 30_000


class ResponsesConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Responses, flex and realtime requests (responses-and-api §2.10, §6, §7)."""

    # Transition evaluations per multi-step response before it fails (§2.10).
    max_iterations: int = 10
    # How long a blocking flex call waits for its request to end before answering 504 (§6).
    poll_timeout_s: float = 3600.0


class PurgeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The purge worker (core §1.7, §2.9, §4.9): reaps rows under soft-deleted batches and
    files, and trims the model-filters log."""

    interval_ms: int = 600_000  # between purge runs; 0 disables the worker
    batch_size: int = 1000  # rows per pass
    throttle_ms: int = 100  # pause after each pass that reaped something
    # An upload whose chunks are this old and whose file was never created stopped part-way
    # (its API died): the purge abandons it and reaps its chunks.
    stale_upload_ms: int = 86_400_000  # 1 day
    model_filters_keep_per_model: int = 50
    model_filters_retention_ms: int = 604_800_000  # 7 days
    # Ended webhook deliveries and their attempts (what GET .../deliveries lists) are kept
    # this long; 0 keeps them for good. A deleted endpoint's go at once.
    webhook_history_retention_ms: int = 2_592_000_000  # 30 days


class WebhooksConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Batch notifications to users' webhook endpoints, delivered by every API process."""

    # AES-256-GCM keys (base64 of 32 bytes) sealing the endpoints' signing secrets on Kafka
    # and in the read model: the first seals new secrets, every one opens. Empty: webhooks
    # are off (endpoints cannot be registered and nothing is delivered). Also settable as
    # CANNONADE_WEBHOOK_SECRET_KEYS (comma-separated), which keeps keys out of the file.
    secret_keys: list[str] = []
    poll_interval_ms: int = 1000
    timeout_ms: int = 10_000  # one delivery's HTTP call
    max_attempts: int = 12
    backoff_ms: int = 5000  # before the 2nd attempt; then x backoff_factor, up to the max
    backoff_factor: float = 2.0
    max_backoff_ms: int = 3_600_000
    batch_size: int = 50  # notifications and deliveries taken per cycle
    # Deliver to loopback, private and link-local addresses too (a single host, tests); off,
    # a tenant's URL cannot reach into the deployment's own network.
    private_hosts: bool = False


class ObservabilityConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Health, metrics and logs of every process."""

    # Where a worker, the projector and the purge worker serve /livez, /readyz and /metrics
    # (the API serves them on its own port); 0 disables the server. `metrics_ports` sets a
    # port per role (commands, gate, executor, chains, projector, purge) over `metrics_port`,
    # for one file shared by processes on one host. CANNONADE_METRICS_PORT wins over both.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    metrics_ports: dict[str, int] = {}
    # json (one object per line), console (for a terminal), or auto: console on a terminal,
    # json otherwise. CANNONADE_LOG_FORMAT wins.
    log_format: Literal["auto", "json", "console"] = "auto"
    # The projector is ready while it trails its topics by at most this many records.
    ready_max_lag: int = 10_000

    def port_for(self, role: str) -> int:
        return self.metrics_ports.get(role, self.metrics_port)


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kafka: str = "127.0.0.1:9092"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/cannonade"
    # Where Faust workers keep local table state.
    data_dir: str = ".run/data"
    models: dict[str, ModelConfig] = {}
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    executor: ExecutorConfig = msgspec.field(default_factory=ExecutorConfig)
    liveness: LivenessConfig = msgspec.field(default_factory=LivenessConfig)
    # The claim gate's rules (urgency_weight, claim_ramp_exponent, leaks_per_window, windows,
    # prefetch: claims queued behind each running call of a model).
    gate: GateConfig = msgspec.field(default_factory=GateConfig)
    responses: ResponsesConfig = msgspec.field(default_factory=ResponsesConfig)
    # Server-side tools, `[tools.<name>]` (responses-and-api §2.2).
    tools: dict[str, ToolConfig] = {}
    purge: PurgeConfig = msgspec.field(default_factory=PurgeConfig)
    webhooks: WebhooksConfig = msgspec.field(default_factory=WebhooksConfig)
    observability: ObservabilityConfig = msgspec.field(default_factory=ObservabilityConfig)

    def model(self, name: str) -> ModelConfig | None:
        return self.models.get(name)


class ConfigError(ValueError):
    """The configuration cannot be loaded: the message says where and why."""


def load(environ: dict[str, str] | None = None) -> Config:
    env = os.environ if environ is None else environ
    try:
        return _load(env)
    except (OSError, ValueError, tomllib.TOMLDecodeError, msgspec.DecodeError) as exc:
        where = env.get("CANNONADE_CONFIG") or "the CANNONADE_* environment"
        raise ConfigError(f"cannot load the configuration ({where}): {exc}") from exc


def _load(env: Mapping[str, str]) -> Config:
    raw: dict[str, object] = {}
    path = env.get("CANNONADE_CONFIG")
    if path:
        raw.update(tomllib.loads(Path(path).read_text()))
    if "CANNONADE_KAFKA" in env:
        raw["kafka"] = env["CANNONADE_KAFKA"]
    if "CANNONADE_DATABASE_URL" in env:
        raw["database_url"] = env["CANNONADE_DATABASE_URL"]
    if "CANNONADE_DATA_DIR" in env:
        raw["data_dir"] = env["CANNONADE_DATA_DIR"]
    if "CANNONADE_MODELS" in env:
        raw["models"] = msgspec.json.decode(env["CANNONADE_MODELS"])
    if env.get("CANNONADE_WEBHOOK_SECRET_KEYS"):
        webhooks = dict(raw.get("webhooks", {}))  # type: ignore[call-overload]
        webhooks["secret_keys"] = [
            k.strip() for k in env["CANNONADE_WEBHOOK_SECRET_KEYS"].split(",") if k.strip()
        ]
        raw["webhooks"] = webhooks
    api = dict(raw.get("api", {}))  # type: ignore[call-overload]
    if "CANNONADE_API_HOST" in env:
        api["host"] = env["CANNONADE_API_HOST"]
    if "CANNONADE_API_PORT" in env:
        api["port"] = int(env["CANNONADE_API_PORT"])
    raw["api"] = api
    observability = dict(raw.get("observability", {}))  # type: ignore[call-overload]
    if "CANNONADE_METRICS_PORT" in env:
        port = int(env["CANNONADE_METRICS_PORT"])
        observability["metrics_port"], observability["metrics_ports"] = port, {}
    if "CANNONADE_METRICS_HOST" in env:
        observability["metrics_host"] = env["CANNONADE_METRICS_HOST"]
    if env.get("CANNONADE_LOG_FORMAT"):
        observability["log_format"] = env["CANNONADE_LOG_FORMAT"]
    raw["observability"] = observability
    return msgspec.convert(raw, Config)
