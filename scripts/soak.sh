#!/usr/bin/env bash
# Opens and abandons sessions against duplex-chat in every way a peer can
# (reset, half-close, Close then drop, never reading, never answering pings,
# mid-frame, mid-handshake) and checks that the server gets back to zero
# sessions, its baseline file descriptors and its memory (see
# crates/duplex-bench/src/bin/soak.rs). Arguments go to the soak:
#
#   scripts/soak.sh                      # 10,000 sessions, the server's defaults
#   scripts/soak.sh --ci                 # 500 sessions, short timeouts, < 60 s
#   scripts/soak.sh --ci --server-arg=--some-flag=2
#   scripts/soak.sh --sessions 2000 --settle-secs 30 --modes rst,no-pong
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/duplex/target}"

# One package at a time: each then builds with the features it has in
# .ci/run and scripts/bench.sh, so nothing is built twice.
cargo build --release --locked --quiet -p duplex-chat
cargo build --release --locked --quiet -p duplex-bench --bin soak
# Thousands of sockets held at once need more descriptors than 1024.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true

# Every peer comes from 127.0.0.1, thousands at once: the per-address
# limits (1,000 sessions, 50 handshakes a second) would refuse them.
args=(--server-arg=--max-sessions-per-ip=0 --server-arg=--handshake-rate=0
      --server-arg=--max-sessions=100000)
if [[ "${1:-}" == "--ci" ]]; then
    shift
    # Pings every second, a second to answer, two seconds for a peer that
    # reads nothing: the peers that never answer or never read are dropped
    # within the phase's settle time.
    args+=(--sessions 500 --settle-secs 15 --time-limit-secs 60
           --server-arg=--ping-period=1 --server-arg=--timeout=1
           --server-arg=--write-timeout=2)
fi
mkdir -p "$CARGO_TARGET_DIR/soak"
exec nice -n 10 "$CARGO_TARGET_DIR/release/soak" \
    --server "$CARGO_TARGET_DIR/release/duplex-chat" \
    --server-log "$CARGO_TARGET_DIR/soak/duplex-chat.log" \
    ${args[@]+"${args[@]}"} "$@"
