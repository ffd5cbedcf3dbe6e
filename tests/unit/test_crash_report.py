"""A service that crashes in native code says where: the entry point turns on faulthandler."""

from __future__ import annotations

import subprocess
import sys

CRASH_AFTER_ENTRY = """
import ctypes, sys
from cannonade import cli
sys.argv = ["cannonade", "--help"]
try:
    cli.run()
except SystemExit:
    pass
def crashing_frame():
    ctypes.string_at(0)  # a read of address 0: SIGSEGV
crashing_frame()
"""


def test_a_segfault_after_the_entry_point_leaves_the_python_stack_on_stderr() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CRASH_AFTER_ENTRY], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "Fatal Python error: Segmentation fault" in done.stderr
    assert "crashing_frame" in done.stderr
