"""The user CLI (`cannonade batch …`, `cannonade keys …`) run as the real command against the
live API, as a user with only an API key would run it: on a terminal (a pty, where the
progress bar is live) and piped (one line per change)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from compose import stack
from compose.services import Services
from projections.api.auth import create_key
from tests.integration.conftest import chat_line, jsonl, run

pytestmark = pytest.mark.integration

CANNONADE = str(Path(sys.executable).with_name("cannonade"))
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def cli_env(services: Services, key: str) -> dict[str, str]:
    return {**os.environ, "CANNONADE_API_URL": services.api_url, "CANNONADE_API_KEY": key}


def cli(
    services: Services, key: str, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``cannonade ARGS`` with its output piped (not a terminal)."""
    return subprocess.run(
        [CANNONADE, *args], env=cli_env(services, key), cwd=cwd,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def cli_on_terminal(
    services: Services, key: str, *args: str, cwd: Path, timeout_s: float = 300
) -> tuple[int, str]:
    """``cannonade ARGS`` on a pseudo-terminal 160 columns wide: its exit code and everything
    it showed, escape sequences removed and each redraw on a line of its own."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = {**cli_env(services, key), "TERM": "xterm-256color", "COLUMNS": "160"}
    proc = subprocess.Popen(
        [CANNONADE, *args], stdin=terminal, stdout=terminal, stderr=terminal, env=env, cwd=cwd
    )
    os.close(terminal)
    shown = bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: the command exited and its terminal closed
                break
            if not data:
                break
            shown += data
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(controller)
    text = ANSI.sub("", shown.decode(errors="replace")).replace("\r\n", "\n").replace("\r", "\n")
    return code, text


def user_key(stack_info: stack.StackInfo, user: str) -> str:
    return str(run(create_key(stack_info.kafka_bootstrap, stack_info.database_url, user)))


def openai_for(services: Services, key: str) -> OpenAI:
    return OpenAI(base_url=f"{services.api_url}/v1", api_key=key, max_retries=0, timeout=60)


def content(services: Services, key: str, file_id: str) -> bytes:
    answer = httpx.get(
        f"{services.api_url}/v1/files/{file_id}/content",
        headers={"Authorization": f"Bearer {key}"}, timeout=60,
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    return answer.content


def write_lines(path: Path, count: int, model: str = "chat-b", **fake: Any) -> Path:
    path.write_bytes(jsonl([chat_line(f"cli-{n}", model=model, **fake) for n in range(count)]))
    return path


def test_submit_watch_on_a_terminal_shows_live_progress_then_downloads_the_results(
    services: Services, stack_info: stack.StackInfo, tmp_path: Path
) -> None:
    key = user_key(stack_info, f"cli-{uuid.uuid4().hex[:6]}")
    # 48 calls of 1 s on chat-b (16 at once): at least 3 s of progress, polled every 0.2 s.
    lines = [chat_line(f"cli-{n}", model="chat-b", latency_ms=1000) for n in range(48)]
    (tmp_path / "in.jsonl").write_bytes(jsonl([*lines, chat_line("cli-bad", model="chat-b", status=400)]))  # fmt: skip
    code, shown = cli_on_terminal(
        services, key, "batch", "submit", "in.jsonl", "--endpoint", "/v1/chat/completions",
        "--window", "24h", "--metadata", "team=cli", "--watch", "--output", "results",
        "--interval", "0.2", cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, shown
    batch_id = re.search(rf"^({UUID})$", shown, re.M)
    assert batch_id is not None, shown
    # The live bar: completed/total, failed, rate and ETA, redrawn as the batch moves.
    bars = re.findall(r"(\d+)/49 completed (\d+) failed ([\d.]+|-) req/s ETA", shown)
    done = [int(c) for c, _, _ in bars]
    assert done and done == sorted(done), shown
    assert any(0 < c < 48 for c in done), f"no intermediate progress shown:\n{shown}"
    assert (done[-1], bars[-1][1]) == (48, "1"), shown
    assert f"batch {batch_id[1]} completed: 48 completed, 1 failed of 49" in shown

    client = openai_for(services, key)
    batch = client.batches.retrieve(batch_id[1])
    assert batch.status == "completed" and batch.metadata == {"team": "cli"}
    results = tmp_path / "results"
    assert (results / "output.jsonl").read_bytes() == content(services, key, batch.output_file_id or "")  # fmt: skip
    assert (results / "errors.jsonl").read_bytes() == content(services, key, batch.error_file_id or "")  # fmt: skip
    assert len((results / "output.jsonl").read_text().splitlines()) == 48
    assert "cli-bad" in (results / "errors.jsonl").read_text()


def test_watch_list_download_and_cancel_piped(
    services: Services, stack_info: stack.StackInfo, tmp_path: Path
) -> None:
    key = user_key(stack_info, f"cli-{uuid.uuid4().hex[:6]}")
    submitted = cli(services, key, "batch", "submit", str(write_lines(tmp_path / "a.jsonl", 32, latency_ms=400)))  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    assert re.fullmatch(UUID, batch_id), submitted.stdout

    # Piped, `watch` prints a line each time the counts move, then the outcome.
    watched = cli(services, key, "batch", "watch", batch_id, "--interval", "0.2")
    assert watched.returncode == 0, watched.stderr
    progress = re.findall(r"^(\w+): (\d+)/32 completed, (\d+) failed", watched.stderr, re.M)
    assert progress[-1] == ("completed", "32", "0"), watched.stderr
    counts = [int(c) for _, c, _ in progress]
    assert counts == sorted(counts), watched.stderr

    listed = cli(services, key, "batch", "list", "--limit", "5")
    assert listed.returncode == 0, listed.stderr
    row = next(r for r in listed.stdout.splitlines() if r.startswith(batch_id))
    assert re.search(r"completed\s+32/32\s+failed 0", row), listed.stdout
    # --json: the API's batch objects whole, as the SDK reads them.
    listed = cli(services, key, "batch", "list", "--limit", "5", "--json")
    assert listed.returncode == 0, listed.stderr
    objects = [openai.types.Batch.model_validate_json(line) for line in listed.stdout.splitlines()]  # fmt: skip
    found = next(b for b in objects if b.id == batch_id)
    assert found.object == "batch" and found.completed_at is not None

    downloaded = cli(services, key, "batch", "download", batch_id, "--output", str(tmp_path / "d"))
    assert downloaded.returncode == 0, downloaded.stderr
    assert downloaded.stdout.split() == [str(tmp_path / "d" / "output.jsonl"), str(tmp_path / "d" / "errors.jsonl")]  # fmt: skip
    batch = openai_for(services, key).batches.retrieve(batch_id)
    assert (tmp_path / "d" / "output.jsonl").read_bytes() == content(services, key, batch.output_file_id or "")  # fmt: skip

    # A batch that would take minutes, cancelled: watching it ends with exit status 3.
    slow = cli(services, key, "batch", "submit", str(write_lines(tmp_path / "s.jsonl", 20, latency_ms=60_000)))  # fmt: skip
    slow_id = slow.stdout.strip()
    cancelled = cli(services, key, "batch", "cancel", slow_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert re.match(rf"{slow_id} (cancelling|cancelled) ", cancelled.stdout), cancelled.stdout
    ended = cli(services, key, "batch", "watch", slow_id, "--interval", "0.2")
    assert ended.returncode == 3, ended.stderr
    assert f"batch {slow_id} cancelled" in ended.stderr
    listed = cli(services, key, "batch", "list", "--status", "cancelled")
    assert [r.split()[0] for r in listed.stdout.splitlines()] == [slow_id]


def test_api_errors_end_the_command_with_the_api_message(
    services: Services, stack_info: stack.StackInfo, tmp_path: Path
) -> None:
    key = user_key(stack_info, f"cli-{uuid.uuid4().hex[:6]}")
    lines = write_lines(tmp_path / "chat.jsonl", 2)
    wrong = cli(services, key, "batch", "submit", str(lines), "--endpoint", "/v1/embeddings")
    assert wrong.returncode == 1 and wrong.stdout == ""
    assert "Error:" in wrong.stderr and "(HTTP 400)" in wrong.stderr, wrong.stderr
    missing = cli(services, key, "batch", "watch", str(uuid.uuid4()))
    assert missing.returncode == 1 and "not found (HTTP 404)" in missing.stderr
    bad_key = cli(services, "cn-not-a-key", "batch", "list")
    assert bad_key.returncode == 1 and "Invalid API key (HTTP 401)" in bad_key.stderr
    unreachable = subprocess.run(
        [CANNONADE, "batch", "list", "--api-url", "http://127.0.0.1:9", "--api-key", key],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert unreachable.returncode == 1 and "cannot reach the API" in unreachable.stderr


def test_keys_list_and_revoke_over_the_api(services: Services, stack_info: stack.StackInfo) -> None:
    user = f"cli-keys-{uuid.uuid4().hex[:6]}"
    first, second = user_key(stack_info, user), user_key(stack_info, user)
    other_user_key = user_key(stack_info, f"cli-other-{uuid.uuid4().hex[:6]}")

    def works(key: str) -> int:
        return httpx.get(
            f"{services.api_url}/v1/files", headers={"Authorization": f"Bearer {key}"}
        ).status_code

    listed = cli(services, first, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()
    assert len(rows) == 2 and all(" active" in r for r in rows), listed.stdout
    current = [r for r in rows if r.endswith("(this key)")]
    assert len(current) == 1
    first_id = current[0].split()[0]
    second_id = next(r.split()[0] for r in rows if r.split()[0] != first_id)
    # --json: the API's key objects whole, one per line.
    objects = [json.loads(r) for r in cli(services, first, "keys", "list", "--json").stdout.splitlines()]  # fmt: skip
    assert {o["id"] for o in objects} == {first_id, second_id}
    assert all(o["object"] == "api_key" and o["revoked_at"] is None for o in objects)
    assert [o["id"] for o in objects if o["current"]] == [first_id]

    revoked = cli(services, first, "keys", "revoke", second_id)
    assert (revoked.returncode, revoked.stdout) == (0, f"revoked {second_id}\n"), revoked.stderr
    assert works(second) == 401 and works(first) == 200
    again = cli(services, first, "keys", "revoke", second_id)  # revoking twice changes nothing
    assert again.returncode == 0
    rows = cli(services, first, "keys", "list").stdout.splitlines()
    assert any(r.startswith(second_id) and " revoked " in r for r in rows), rows

    # Another user's key is not found, exactly like a missing one; it keeps working.
    theirs = cli(services, other_user_key, "keys", "list").stdout.split()[0]
    foreign = cli(services, first, "keys", "revoke", theirs)
    assert foreign.returncode == 1 and "not found (HTTP 404)" in foreign.stderr
    assert works(other_user_key) == 200

    # The operators' view of the same keys, straight from the read model.
    admin = subprocess.run(
        [CANNONADE, "admin", "keys", "list", "--user", user],
        env=services.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert admin.returncode == 0, admin.stderr
    assert sorted(r.split()[0] for r in admin.stdout.splitlines()) == sorted([first_id, second_id])
    assert "revoked" in next(r for r in admin.stdout.splitlines() if r.startswith(second_id))
    admin_json = subprocess.run(
        [CANNONADE, "admin", "keys", "list", "--user", user, "--json"],
        env=services.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert admin_json.returncode == 0, admin_json.stderr
    revoked_at = {o["id"]: o["revoked_at"] for o in map(json.loads, admin_json.stdout.splitlines()) if o["user"] == user}  # fmt: skip
    assert revoked_at.keys() == {first_id, second_id} and revoked_at[first_id] is None
    assert isinstance(revoked_at[second_id], int)

    # Revoking the key in use: it stops working once the command returns.
    own = cli(services, first, "keys", "revoke", first_id)
    assert own.returncode == 0 and "no longer works" in own.stderr
    assert works(first) == 401
    after = cli(services, first, "keys", "list")
    assert after.returncode == 1 and "Invalid API key (HTTP 401)" in after.stderr
