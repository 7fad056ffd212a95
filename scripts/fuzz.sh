#!/usr/bin/env bash
# Fuzzing on stable Rust: cargo-fuzz with libFuzzer (built from source by
# libfuzzer-sys) and no sanitizer, so no nightly toolchain is needed.
#
#   scripts/fuzz.sh --ci              build every target, run each for
#                                     FUZZ_SECONDS (default 30) seconds,
#                                     less after a cold build: see below
#   scripts/fuzz.sh TARGET SECONDS    one long run by hand
#   scripts/fuzz.sh --list            the targets
#
# Installs cargo-fuzz when it is missing. Exits non-zero when a target
# crashes (the input is left in fuzz/artifacts/TARGET/) or fails to build.
# The corpus grows in $CARGO_TARGET_DIR/fuzz/corpus/TARGET, outside the
# clone, so each CI run starts from what the last one found; the seeds in
# fuzz/seeds/TARGET are read too. Runs at nice 10: fuzzing takes a core.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
TARGETS=(frame_decode_server frame_decode_client extensions_header upgrade_request inflate chat_request http2_preface)
# The fuzz crate is its own workspace; its build goes next to the main one's.
FUZZ_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/fuzz"

usage() {
    sed -n '5,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

ensure_cargo_fuzz() {
    if cargo fuzz --version >/dev/null 2>&1; then
        return 0
    fi
    echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked"
    cargo install cargo-fuzz --locked
}

# -s none: no sanitizer, the one mode that builds on stable (AddressSanitizer
# needs -Zsanitizer). Safe Rust needs none to catch what matters here:
# panics, overflows (debug assertions are on) and the targets' assertions.
build() {
    nice -n 10 cargo fuzz build -s none --target-dir "$FUZZ_TARGET_DIR" "$@"
}

# Runs one target for $2 seconds; prints libFuzzer's closing statistics.
run() {
    local target=$1 seconds=$2 log status
    local corpus="$FUZZ_TARGET_DIR/corpus/$target"
    mkdir -p "$corpus" "fuzz/seeds/$target" "fuzz/artifacts/$target"
    log=$(mktemp)
    # Frames with payloads past the small limits need room to be found.
    local max_len=4096
    case $target in frame_decode_*) max_len=16384 ;; esac
    nice -n 10 cargo fuzz run -s none --target-dir "$FUZZ_TARGET_DIR" "$target" \
        "$corpus" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1
    status=$?
    local done_line execs
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1)
    execs=$(grep -E '^stat::number_of_executed_units:' "$log" | awk '{print $2}')
    local files
    files=$(find "$corpus" -type f | wc -l)
    if ((status != 0)); then
        tail -60 "$log"
        echo "FAILED: $target crashed or failed (exit $status); input in fuzz/artifacts/$target/"
    else
        echo "$target: ${seconds}s, ${execs:-?} executions, corpus $files files; ${done_line:-}"
    fi
    rm -f "$log"
    return $status
}

case "${1:-}" in
--ci)
    ensure_cargo_fuzz || exit 1
    start=$SECONDS
    build || { echo "FAILED: cargo fuzz build"; exit 1; }
    built=$((SECONDS - start))
    # The step keeps within FUZZ_BUDGET (default 240 s) in all: a warm
    # build leaves 30 s a target, a cold one (about 165 s here) at least 10.
    seconds=$(((${FUZZ_BUDGET:-240} - built) / ${#TARGETS[@]}))
    ((seconds > ${FUZZ_SECONDS:-30})) && seconds=${FUZZ_SECONDS:-30}
    ((seconds < 10)) && seconds=10
    echo "built every target in $built s; $seconds s a target"
    failed=0
    for target in "${TARGETS[@]}"; do
        run "$target" "$seconds" || failed=$((failed + 1))
    done
    echo "fuzzing: $((${#TARGETS[@]} - failed)) targets clean, $failed crashed ($((SECONDS - start)) s in all)"
    ((failed == 0))
    ;;
--list)
    printf '%s\n' "${TARGETS[@]}"
    ;;
"" | -h | --help)
    usage
    ;;
*)
    target=$1
    seconds=${2:-}
    [[ " ${TARGETS[*]} " == *" $target "* ]] || { echo "unknown target $target"; usage; }
    [[ $seconds =~ ^[0-9]+$ ]] || usage
    ensure_cargo_fuzz || exit 1
    build "$target" || { echo "FAILED: cargo fuzz build $target"; exit 1; }
    run "$target" "$seconds"
    ;;
esac
