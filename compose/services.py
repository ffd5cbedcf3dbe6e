"""The no-Docker local stack's services: every Cannonade role as a supervised subprocess.

Used by the demo, the integration tests and the benchmarks. Each service logs to
``<run_dir>/logs/<name>.log``; :meth:`Services.start` returns once all of them are ready.
Every Cannonade process answers ``/livez``, ``/readyz`` and ``/metrics`` at
:meth:`Services.health_url` (the API on its own port, the others on a port of their own), and
is ready when its ``/readyz`` says so.

A supervisor thread restarts any service that exits before :meth:`Services.stop` (a crash, a
lost database, a test's :meth:`Services.kill`), after a backoff of 0.5 s doubling to 5 s, back
to 0.5 s once a run lasted a minute. Each restart is logged to the service's log
and counted in :attr:`Services.restarts`; :meth:`Services.wait_ready` and
:meth:`Services.wait_restarted` wait on the service's readiness, which :meth:`Services._probe`
defines for every role in one place.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from prometheus_client.parser import text_string_to_metric_families

from compose.kafka import free_ports

WORKER_ROLES = ("commands", "gate", "executor", "chains")
_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 5.0
_STABLE_S = 60.0  # a run this long resets the backoff
_POLL_S = 0.1


class ModelSpec(msgspec.Struct, frozen=True):
    kind: str = "chat"
    concurrency: int = 8


def free_port() -> int:
    return free_ports(1)[0]


def write_config(
    path: Path,
    models: Mapping[str, ModelSpec],
    upstream: str,
    api_port: int,
    extra: str = "",
    windows: Sequence[str] = ("24h", "1h"),
) -> None:
    allowed = ", ".join(f'"{w}"' for w in windows)
    lines = [
        f"[api]\nport = {api_port}\nprojection_wait_s = 30.0\nallowed_completion_windows = [{allowed}]\n",
        extra,
    ]
    for name, spec in models.items():
        lines.append(
            f'[models."{name}"]\nkind = "{spec.kind}"\nupstream = "{upstream}"\n'
            f'api_key = "local-upstream-key"\nconcurrency = {spec.concurrency}\n'
        )
    path.write_text("\n".join(lines))


# One Prometheus sample: (name, labels, value).
Sample = tuple[str, dict[str, str], float]


def metric_samples(text: str) -> list[Sample]:
    """Every sample of a ``/metrics`` answer in the Prometheus text format."""
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


# Whether a service's current run is ready. Only ever asked about a live process.
Probe = Callable[[], bool]


def http_probe(url: str) -> Probe:
    """Ready once ``url`` answers 2xx."""

    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except OSError:
            return False

    return probe


def running_probe() -> bool:
    """For a service without a readiness endpoint: ready as soon as it runs."""
    return True


@dataclass
class _Service:
    """One supervised service and its current run (``proc`` onwards)."""

    name: str
    argv: list[str]
    env: Mapping[str, str]
    log: Path
    probe: Probe
    proc: subprocess.Popen[bytes]
    started_at: float
    ready: bool = False  # this run's probe has passed
    restart_at: float | None = None  # set while the service waits out its backoff
    backoff_s: float = _BACKOFF_MIN_S
    ever_ready: bool = False  # False with an exit: it has never come up, so waits fail
    exits: list[str] = field(default_factory=list)  # how recent runs ended, for errors


def _launch(
    log: Path, argv: list[str], env: Mapping[str, str]
) -> tuple[subprocess.Popen[bytes], float]:
    """Spawn a run appending to ``log``: its process and start time."""
    with log.open("ab") as out:
        # Own session: kill() and stop() signal the whole group, and a Ctrl-C in the
        # launching terminal does not reach the services.
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return proc, time.monotonic()


def _log_line(path: Path, text: str) -> None:
    """A line of the supervisor's own in the service's log, shaped like the service's lines."""
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    line = {"time": now, "level": "info", "role": "supervisor", "message": text}
    with path.open("a") as fh:
        fh.write(json.dumps(line) + "\n")


class Services:
    def __init__(
        self,
        run_dir: Path,
        kafka: str,
        database_url: str,
        models: Mapping[str, ModelSpec],
        *,
        executors: int = 1,
        gates: int = 1,
        upstream_latency_ms: int = 0,
        extra_config: str = "",
        windows: Sequence[str] = ("24h", "1h"),
        chains: int = 1,
        apis: int = 1,
    ) -> None:
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.upstream_port = free_port()
        self.api_port = free_port()
        self.tools_port = free_port()
        self.upstream_url = f"http://127.0.0.1:{self.upstream_port}"
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        # Every API process by service name (`api`, `api-1`, ...), each on its own port; they
        # share the read model, and each runs the webhook notifier.
        self.apis = apis
        self.api_urls: dict[str, str] = {}
        # Where each other Cannonade process serves /livez, /readyz and /metrics.
        self.health_ports: dict[str, int] = {}
        # The fake tool server (cannonade.testing.fake_tools): `[tools.<name>]` tables in
        # ``extra_config`` reach it through the ``{tools_url}`` placeholder.
        self.tools_url = f"http://127.0.0.1:{self.tools_port}"
        self.config_path = run_dir / "cannonade.toml"
        write_config(
            self.config_path, models, self.upstream_url, self.api_port,
            self.fill_placeholders(extra_config), windows,
        )  # fmt: skip
        self.env = {
            **os.environ,
            "CANNONADE_CONFIG": str(self.config_path),
            "CANNONADE_KAFKA": kafka,
            "CANNONADE_DATABASE_URL": database_url,
            "CANNONADE_DATA_DIR": str(run_dir / "data"),
            "PYTHONUNBUFFERED": "1",
        }
        self.counts = {"gate": gates, "executor": executors, "commands": 1, "chains": chains}
        self.latency_ms = upstream_latency_ms
        # The current process of each service (replaced on every restart).
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts: dict[str, int] = {}
        self._services: dict[str, _Service] = {}
        # Guards the three above: the supervisor thread restarts while callers kill and wait.
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    def fill_placeholders(self, text: str) -> str:
        """Configuration text with the addresses known only now: ``{tools_url}``,
        ``{upstream_url}`` and ``{api_url}`` (TOML's own braces are left alone)."""
        for name in ("tools_url", "upstream_url", "api_url"):
            text = text.replace("{" + name + "}", getattr(self, name))
        return text

    def health_url(self, name: str) -> str:
        """Where Cannonade process ``name`` serves ``/livez``, ``/readyz`` and ``/metrics``."""
        if name in self.api_urls:
            return self.api_urls[name]
        return f"http://127.0.0.1:{self.health_ports[name]}"

    def metrics(self, name: str) -> list[Sample]:
        """What Cannonade process ``name`` serves at ``/metrics`` now."""
        with urllib.request.urlopen(f"{self.health_url(name)}/metrics", timeout=30) as resp:
            return metric_samples(resp.read().decode())

    def _with_health_port(self, name: str, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` with a port of its own for ``name``'s health and metrics server (kept
        across its restarts)."""
        port = self.health_ports.setdefault(name, free_port())
        return {**env, "CANNONADE_METRICS_PORT": str(port)}

    def _probe(self, name: str) -> Probe:
        """How to tell that ``name`` is ready, in one place for every role."""
        role = name.split("-", 1)[0]
        if role == "upstream":
            return http_probe(f"{self.upstream_url}/_stats")
        if role == "tools":
            return http_probe(f"{self.tools_url}/_stats")
        if name in self.api_urls or name in self.health_ports:
            return http_probe(f"{self.health_url(name)}/readyz")
        return running_probe

    def start_service(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> str:
        """Start ``python <args>`` as service ``name`` under supervision, logging to
        ``logs/<name>.log``; a no-op for a name already supervised. Returns at once."""
        with self._lock:
            if name in self._services:
                return name
            log, argv, env = self.logs / f"{name}.log", [sys.executable, *args], env or self.env
            proc, started_at = _launch(log, argv, env)
            svc = _Service(name, argv, env, log, self._probe(name), proc, started_at)
            self._services[name], self.procs[name], self.restarts[name] = svc, proc, 0
            if self._supervisor is None:
                self._supervisor = threading.Thread(
                    target=self._supervise, name="services-supervisor", daemon=True
                )
                self._supervisor.start()
        return name

    def start(self, timeout_s: float = 120.0) -> None:
        """Start every service and return once all are ready."""
        self.start_service(
            "upstream", "-m", "cannonade.testing.fake_upstream",
            "--port", str(self.upstream_port), "--latency-ms", str(self.latency_ms),
        )  # fmt: skip
        self.start_service(
            "tools", "-m", "cannonade.testing.fake_tools", "--port", str(self.tools_port)
        )
        for name in ("projector", "purge"):
            env = self._with_health_port(name, self.env)
            self.start_service(name, "-m", "cannonade.cli", name, env=env)
        for role in WORKER_ROLES:
            for n in range(self.counts[role]):
                self.start_worker(role, n)
        for n in range(self.apis):
            self.start_api(n)
        deadline = time.monotonic() + timeout_s
        for name in list(self._services):
            self.wait_ready(name, max(0.0, deadline - time.monotonic()))
        # A service without a probe of its own (running_probe) counts as ready at once, so its
        # crash at startup only shows as an exit; any exit while starting is a broken setup.
        with self._lock:
            crashed = next((svc for svc in self._services.values() if svc.exits), None)
        if crashed is not None:
            raise RuntimeError(
                f"{crashed.name} exited while starting ({', '.join(crashed.exits)}):\n"
                f"{self._tail(crashed.name)}"
            )

    def start_worker(self, role: str, n: int = 0) -> str:
        """Start worker ``<role>-<n>`` (see :meth:`start_service`: a no-op for one already
        supervised, which comes back by itself after an exit)."""
        name = f"{role}-{n}"
        env = {**self.env, "CANNONADE_DATA_DIR": str(self.run_dir / "data" / name)}
        env = self._with_health_port(name, env)
        return self.start_service(name, "-m", "cannonade.cli", "worker", role, env=env)

    def start_api(self, n: int = 0, env: Mapping[str, str] | None = None) -> str:
        """Start API process ``n`` (0 is ``api`` on :attr:`api_url`; others ``api-<n>``, each
        on a port of its own, in :attr:`api_urls`), with ``env`` over the services' own (another
        ``CANNONADE_CONFIG``, say). A no-op for one already supervised."""
        name = "api" if n == 0 else f"api-{n}"
        port = self.api_port if n == 0 else free_port()
        if name in self.api_urls:
            return name
        self.api_urls[name] = f"http://127.0.0.1:{port}"
        run_env = {**self.env, **(env or {}), "CANNONADE_API_PORT": str(port)}
        return self.start_service(name, "-m", "cannonade.cli", "api", env=run_env)

    def _supervise(self) -> None:
        while not self._stopping.wait(_POLL_S):
            with self._lock:
                services = list(self._services.values())
                for svc in services:
                    self._tend(svc)
            # Probed outside the lock, which kill() and waits need meanwhile: an HTTP probe
            # may take a second. Only this thread replaces a run, so the result is this run's.
            for svc in services:
                if not svc.ready and svc.proc.poll() is None and svc.probe():
                    with self._lock:
                        svc.ready = svc.ever_ready = True

    def _tend(self, svc: _Service) -> None:
        """Under the lock: notice an exit, schedule the restart, and restart when due."""
        now = time.monotonic()
        if svc.restart_at is None:
            code = svc.proc.poll()
            if code is None:
                return
            uptime = now - svc.started_at
            if uptime >= _STABLE_S:
                svc.backoff_s = _BACKOFF_MIN_S
            svc.ready, svc.restart_at = False, now + svc.backoff_s
            svc.exits = [*svc.exits[-4:], f"exit {code} after {uptime:.1f}s"]
            _log_line(
                svc.log,
                f"{svc.name} exited with {code} after {uptime:.1f}s; "
                f"restarting in {svc.backoff_s:.1f}s",
            )
            svc.backoff_s = min(svc.backoff_s * 2, _BACKOFF_MAX_S)
        elif now >= svc.restart_at:
            try:
                svc.proc, svc.started_at = _launch(svc.log, svc.argv, svc.env)
            except OSError as exc:  # out of pids or fds, say: try again after a backoff
                svc.restart_at = now + svc.backoff_s
                _log_line(svc.log, f"{svc.name} restart failed: {exc!r}")
                return
            svc.restart_at = None
            self.procs[svc.name] = svc.proc
            self.restarts[svc.name] += 1
            _log_line(svc.log, f"{svc.name} restart #{self.restarts[svc.name]}: pid {svc.proc.pid}")

    def wait_ready(self, name: str, timeout_s: float = 120.0) -> None:
        """Wait until the current run of ``name`` is ready (see :meth:`_probe`) and still is
        when asked: a worker that was ready once may be rebalancing or recovering its tables
        now. Through any restarts. A service that exits before it was ever ready fails the
        wait (a broken setup, which restarting does not fix)."""
        self._wait(name, 0, timeout_s)

    def wait_restarted(self, name: str, since: int, timeout_s: float = 120.0) -> None:
        """Wait until ``name`` has been restarted more than ``since`` times (the count
        :meth:`kill` returns) and that run is ready."""
        self._wait(name, since + 1, timeout_s)

    def _wait(self, name: str, restarts: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                svc = self._services[name]
                # poll(): the supervisor clears `ready` up to _POLL_S after an exit.
                ran = svc.ready and svc.proc.poll() is None and self.restarts[name] >= restarts
                failed = not svc.ever_ready and bool(svc.exits)
                exits = ", ".join(svc.exits) or "none"
            # `ready` is latched per run; probed again (outside the lock, as the supervisor
            # does) so that the answer is the service's now.
            if ran and svc.probe():
                return
            if failed:
                raise RuntimeError(
                    f"{name} exited before it was ready ({exits}):\n{self._tail(name)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{name} not ready after {timeout_s:.0f}s (runs ended: {exits}):\n"
                    f"{self._tail(name)}"
                )
            time.sleep(_POLL_S)

    def _tail(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Signal ``name``'s process group and wait for it to exit; the supervisor then
        restarts it. Returns the restart count before the kill, for :meth:`wait_restarted`."""
        with self._lock:
            proc, count = self.procs[name], self.restarts[name]
            # Under the lock: the supervisor cannot reap it (and free its pid) in between.
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
        proc.wait(timeout=30)
        return count

    def stop(self) -> None:
        """Stop supervising, then SIGTERM every service (SIGKILL after 15 s)."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        procs = list(self.procs.values())
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        end = time.monotonic() + 15
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def rss_kib(self) -> dict[str, int]:
        """Peak resident memory (VmHWM) of each live service."""
        peaks: dict[str, int] = {}
        for name, proc in list(self.procs.items()):
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peaks[name] = int(line.split()[1])
        return peaks
