"""The no-Docker local stack's services: every Cannonade role as a supervised subprocess.

Used by the demo, the integration tests and the benchmarks. Each service logs to
``<run_dir>/logs/<name>.log``; :meth:`Services.start` returns once all of them are ready.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import msgspec

WORKER_ROLES = ("commands", "gate", "executor")


class ModelSpec(msgspec.Struct, frozen=True):
    kind: str = "chat"
    concurrency: int = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    ) -> None:
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.upstream_port = free_port()
        self.api_port = free_port()
        self.upstream_url = f"http://127.0.0.1:{self.upstream_port}"
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.config_path = run_dir / "cannonade.toml"
        write_config(
            self.config_path, models, self.upstream_url, self.api_port, extra_config, windows
        )
        self.env = {
            **os.environ,
            "CANNONADE_CONFIG": str(self.config_path),
            "CANNONADE_KAFKA": kafka,
            "CANNONADE_DATABASE_URL": database_url,
            "CANNONADE_DATA_DIR": str(run_dir / "data"),
            "PYTHONUNBUFFERED": "1",
        }
        self.counts = {"gate": gates, "executor": executors, "commands": 1}
        self.latency_ms = upstream_latency_ms
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(
        self, name: str, *args: str, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, *args], env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.procs[name] = proc
        return proc

    def start(self, timeout_s: float = 120.0) -> None:
        self._spawn(
            "upstream", "-m", "cannonade.testing.fake_upstream",
            "--port", str(self.upstream_port), "--latency-ms", str(self.latency_ms),
        )  # fmt: skip
        self._spawn("projector", "-m", "cannonade.cli", "projector")
        for role in WORKER_ROLES:
            for n in range(self.counts[role]):
                self.start_worker(role, n)
        self._spawn("api", "-m", "cannonade.cli", "api")
        deadline = time.monotonic() + timeout_s
        self._wait_http(f"{self.upstream_url}/_stats", deadline)
        self._wait_http(f"{self.api_url}/healthz", deadline)
        for name in self.procs:
            if name.split("-")[0] in WORKER_ROLES:
                self.wait_ready(name, deadline)

    def start_worker(self, role: str, n: int = 0) -> str:
        name = f"{role}-{n}"
        env = {**self.env, "CANNONADE_DATA_DIR": str(self.run_dir / "data" / name)}
        self._spawn(name, "-m", "cannonade.cli", "worker", role, env=env)
        return name

    def wait_ready(self, name: str, deadline: float) -> None:
        """A Faust worker logs ``Ready`` once it has joined its group and recovered tables."""
        path = self.logs / f"{name}.log"
        while time.monotonic() < deadline:
            self._check_alive(name)
            if b"Ready" in path.read_bytes():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{name} not ready; see {path}")

    def _check_alive(self, name: str) -> None:
        code = self.procs[name].poll()
        if code is not None:
            tail = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} exited with {code}:\n{tail}")

    def _wait_http(self, url: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            for name in self.procs:
                self._check_alive(name)
            try:
                with urllib.request.urlopen(url, timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"{url} did not answer")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        end = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def rss_kib(self) -> dict[str, int]:
        """Peak resident memory (VmHWM) of each live service."""
        peaks: dict[str, int] = {}
        for name, proc in self.procs.items():
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peaks[name] = int(line.split()[1])
        return peaks
