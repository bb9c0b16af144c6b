#!/usr/bin/env bash
# End-to-end tests of the relay through the official Python clients (openai,
# ollama), and the JavaScript ones for several devices per user. Run from the
# repository root:  bash tests/clients/run.sh
#
# Environment:
#   TUNNEL_BIN_DIR  where relayd, agentd and stand-in-ollama are
#                   (default: ${CARGO_TARGET_DIR:-target}/release)
#   CLIENTS_VENV    the virtualenv to create or reuse (default: target/clients-venv)
#   PYTHON          the interpreter that makes the venv (default: python3; >= 3.11)
#   CLIENT_TESTS_KEEP=1  keep the temp dir with configs and process logs
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

bin_dir="${TUNNEL_BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}"
case "$bin_dir" in /*) ;; *) bin_dir="$root/$bin_dir" ;; esac
missing=()
for b in relayd agentd stand-in-ollama; do
    [[ -x "$bin_dir/$b" ]] || missing+=("$bin_dir/$b")
done
if ((${#missing[@]})); then
    echo "error: missing ${missing[*]}" >&2
    echo "build first: cargo build --release --bins" >&2
    exit 1
fi
export TUNNEL_BIN_DIR="$bin_dir"

python="${PYTHON:-python3}"
venv="${CLIENTS_VENV:-target/clients-venv}"

if ! command -v "$python" >/dev/null 2>&1; then
    echo "error: $python not found; install Python 3.11 or newer (Debian: apt-get install python3 python3-venv)" >&2
    exit 1
fi

# A venv is reused only if its pip works; a half-made one (e.g. from a
# python3 -m venv that failed for lack of ensurepip) is made again.
if [[ -f "$venv/pyvenv.cfg" ]] && ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "removing the broken virtualenv $venv" >&2
    rm -rf -- "$venv"
fi
if [[ ! -x "$venv/bin/python" ]]; then
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "error: $("$python" --version 2>&1) is too old: httpx2 (used by openai 3.x) needs Python >= 3.11; set PYTHON=" >&2
        exit 1
    fi
    if ! "$python" -m venv "$venv"; then
        rm -rf -- "$venv"
        echo "error: '$python -m venv' failed. On Debian/Ubuntu install the venv module:" >&2
        echo "    apt-get install python3-venv   (or python3.X-venv for your version)" >&2
        exit 1
    fi
fi

"$venv/bin/python" -m pip install -q --disable-pip-version-check -r tests/clients/requirements.txt

# The JavaScript clients (ollama, openai), pinned by package-lock.json.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "error: node and npm not found; install Node.js 20 or newer (Debian: apt-get install nodejs npm)" >&2
    exit 1
fi
npm ci --prefix tests/clients/js --no-audit --no-fund --loglevel=error >/dev/null

# Same as `python -m unittest -v tests.clients.test_clients`, plus a closing
# `clients: N passed, N failed` line; non-zero exit when anything failed.
exec "$venv/bin/python" -m tests.clients.test_clients
