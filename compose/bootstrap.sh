#!/usr/bin/env bash
# Set up everything Cannonade's tests and local stack need on a fresh Debian machine, and
# nothing twice: a virtualenv with the project installed, Maven + a JRE, the PostgreSQL 15
# server binaries, and the Kafka broker jars. Safe to run (or source) again and again.
#
#   CANNONADE_VENV    virtualenv to create/reuse (default ~/.cache/cannonade/venv)
#   CANNONADE_PYTHON  interpreter for a new venv (default python3.11)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CANNONADE_VENV:-$HOME/.cache/cannonade/venv}"
PYTHON="${CANNONADE_PYTHON:-python3.11}"
PG_BIN="${CANNONADE_PG_BIN:-/usr/lib/postgresql/15/bin}"
export VENV

say() { printf 'bootstrap: %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
APT_UPDATED=""
apt_install() {
    if [ -z "$APT_UPDATED" ]; then
        say "apt-get update"
        $SUDO apt-get update -qq
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- system packages (only when missing) -------------------------------------------------
missing=()
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
[ -x "$PG_BIN/initdb" ] || missing+=(postgresql-15)
command -v "$PYTHON" >/dev/null 2>&1 || missing+=(python3.11 python3.11-venv)
# The dashboard's browser test drives Debian's Chromium through its chromedriver.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
else
    say "java, mvn, postgresql 15, $PYTHON, chromium: present"
fi

# --- virtualenv + editable install (skipped while pyproject.toml is unchanged) ------------
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
    say "creating virtualenv $VENV"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
        # Debian's python3.11 lacks ensurepip without the -venv package.
        apt_install python3.11-venv
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV"
    fi
fi
want="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
stamp="$VENV/.cannonade-pyproject.sha256"
# The editable install points at one checkout: reinstall when the venv serves another one.
have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$have" != "$want $REPO" ] || ! (cd / && "$VENV/bin/python" -c 'import cannonade, compose') 2>/dev/null; then
    say "pip install -e '.[dev]' into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$REPO[dev]"
    printf '%s %s\n' "$want" "$REPO" >"$stamp"
else
    say "virtualenv $VENV up to date"
fi

# --- Kafka broker jars from Maven Central (cached per version) ----------------------------
(cd "$REPO" && "$VENV/bin/python" -m compose.kafka fetch)
say "ready (venv: $VENV)"
