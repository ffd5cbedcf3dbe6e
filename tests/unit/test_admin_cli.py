"""The operator's commands meet a deployment that is not there, or not right: each says so in
a line and exits non-zero, never with a traceback (a defect keeps its traceback)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from projections.api.auth import issue_key
from schemas.errors import ApiError

UNREACHABLE_DB = "postgresql://cannonade@127.0.0.1:1/nowhere"


def cannonade(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CANNONADE_")}
    return subprocess.run(
        [sys.executable, "-m", "cannonade.cli", *args],
        env=environ | {"CANNONADE_DATABASE_URL": UNREACHABLE_DB} | env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (("workers",), {}, "is the broker or the database reachable?"),
        (("admin", "keys", "list"), {}, "is the broker or the database reachable?"),
        (
            ("workers",),
            {"CANNONADE_CONFIG": "/nonexistent.toml"},
            "cannot load the configuration (/nonexistent.toml)",
        ),  # fmt: skip
        (("workers",), {"CANNONADE_API_PORT": "abc"}, "cannot load the configuration"),
    ],
)
def test_a_deployment_that_is_not_there_is_told_in_a_line(args: tuple[str, ...], env: dict[str, str], says: str) -> None:  # fmt: skip
    done = cannonade(*args, **env)
    assert done.returncode == 1 and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_window_that_is_not_label_start_end_is_a_usage_error() -> None:
    done = cannonade("pending-counts", "--window", "1h")
    assert done.returncode == 2 and "is not LABEL:START:END" in done.stderr, done.stderr


async def test_a_key_for_a_user_the_read_model_would_refuse_is_never_published() -> None:
    sent: list[object] = []

    class Publisher:
        async def key(self, record: object) -> None:
            sent.append(record)

    for user in ("", "u" * 257, "a\x00b"):
        with pytest.raises(ApiError) as info:
            await issue_key(Publisher(), None, user)  # type: ignore[arg-type]
        assert (info.value.status, info.value.param) == (400, "user")
    assert sent == []
