"""The fake upstream every side of a benchmark shares: one process, started once, on loopback.

``cannonade.testing.fake_upstream`` at a fixed latency; its counters are reset before each run
and a new one is started if something outside the benchmark killed it between runs.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.baseline import BenchError, log
from compose.services import free_port


class Upstream:
    """One fake upstream process for every run of both sides."""

    def __init__(self, run_root: Path, latency_ms: int) -> None:
        self.latency_ms = latency_ms
        self.log_path = run_root / "upstream.log"
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "cannonade.testing.fake_upstream",
               "--port", str(port), "--latency-ms", str(self.latency_ms)]  # fmt: skip
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                self._call("GET", "/_stats")
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise BenchError(f"fake upstream did not start; see {self.log_path}") from None
                time.sleep(0.2)

    def ensure(self) -> None:
        """Start a new upstream (on a new port) if the last one is gone. On a shared box
        something outside the benchmark can kill it (seen once: SIGTERM, nothing logged)."""
        code = self.proc.poll()
        if code is not None:
            log(f"warning: the fake upstream exited ({code}) between runs; starting a new one")
            self.restarts += 1
            self._start()

    async def died(self) -> int:
        """Returns the exit code once the upstream process has exited."""
        # Polled: a child's exit raises no event (and a waiting thread could not be cancelled).
        while (code := self.proc.poll()) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        return code

    def _call(self, method: str, path: str) -> bytes:
        req = urllib.request.Request(f"{self.url}{path}", method=method)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return bytes(resp.read())

    def reset(self) -> None:
        self._call("POST", "/_reset")

    def stats(self) -> dict[str, Any]:
        data = json.loads(self._call("GET", "/_stats"))
        models = data.get("models", {})
        statuses: dict[str, int] = {}
        for m in models.values():
            for code, count in (m.get("statuses") or {}).items():
                statuses[str(code)] = statuses.get(str(code), 0) + count
        # Seconds at each number in flight, from the first call to the last answer.
        seconds = {int(level): s for level, s in (data.get("seconds_at") or {}).items()}
        total = sum(seconds.values())
        peak = data.get("max_in_flight") or 0
        return {
            "calls": sum(m.get("calls", 0) for m in models.values()),
            "max_in_flight": peak,
            "statuses": statuses,
            "mean_in_flight": round(sum(k * s for k, s in seconds.items()) / total, 1)
            if total
            else None,
            "share_at_max": round(seconds.get(peak, 0.0) / total, 3) if total else None,
            "seconds_at": seconds,
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
