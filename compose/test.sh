#!/usr/bin/env bash
# The test command (README, CI): set the machine up, then run pytest with any args passed
# through. The tests start their own Kafka + PostgreSQL (compose.stack); nothing else needed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash "$REPO/compose/bootstrap.sh"
VENV="${CANNONADE_VENV:-$HOME/.cache/cannonade/venv}"

rc=0
"$VENV/bin/python" -m pytest -q "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    # pytest's "no tests collected": a typo'd path or marker must not pass as green.
    echo "test.sh: pytest collected no tests (exit 5): failing" >&2
    exit 1
fi
exit "$rc"
