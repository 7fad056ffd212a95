#!/usr/bin/env bash
# Runs the duplex-bench scenarios over every server and prints the markdown
# table (stdout) with per-run progress (stderr). Arguments go to the runner:
#
#   scripts/bench.sh                      # 3 rounds x 5 s, every scenario (~17 min)
#   scripts/bench.sh --rounds 1 --duration 2 --scenarios 1,2
#   scripts/bench.sh --smoke              # every server x every mode, seconds
#   scripts/bench.sh --replot docs/bench/results.json   # table and charts again
#
# Charts (SVG) and results.json go to docs/bench (--charts DIR; the smoke run
# draws them into a temporary folder; --no-charts skips them).
# Servers run pinned to CPU 0 and the load generator to CPU 1 (taskset).
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/duplex/target}"

# duplex-chat: scenario 10 runs it.
cargo build --release --locked --quiet -p duplex-bench -p duplex-chat --bins
# 10,000 connections need more descriptors than the usual 1024.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true
exec "$CARGO_TARGET_DIR/release/duplex-bench" --no-build "$@"
