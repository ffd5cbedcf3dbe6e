#!/usr/bin/env bash
# The main job (README): set the machine up, bring up the local stack and every service, run
# a demo batch against the fake upstream, print where the results are, take it all down.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash "$REPO/compose/bootstrap.sh"
VENV="${CANNONADE_VENV:-$HOME/.cache/cannonade/venv}"
exec "$VENV/bin/cannonade" demo "$@"
