#!/usr/bin/env bash
# Runs the whole tunnel on this machine: builds relayd, agentd and the
# stand-in Ollama, starts them, streams a chat through the tunnel, prints a
# curl line to try it yourself, and keeps the tunnel up until Ctrl-C.
# Pass --once to exit after the chat (the tunnel stops with it, so it prints
# no curl or tunnelctl line to try).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v cargo >/dev/null; then
    echo "demo.sh: cargo is not installed; install a Rust toolchain (rustup) first" >&2
    exit 1
fi
echo "Building (release; the first build takes a few minutes)..." >&2
cargo build --release --quiet --bins
exec "${CARGO_TARGET_DIR:-target}/release/tunnel-demo" "$@"
