#!/usr/bin/env bash
# Run the duplex client against the Autobahn|Testsuite fuzzing server and
# check the results with the same rules as the server's run (check.py).
#
# Usage: run-client.sh --client PATH --out OUTDIR [--exclude 'PATTERNS'] [--expect N]
#
#   --client   the autobahn_client example binary
#              (cargo build --release -p duplex --example autobahn_client)
#   --out      output folder: spec.json, wstest.log and reports/ (HTML + JSON)
#   --exclude  comma-separated case patterns to leave out (default none: the
#              whole suite, 517 cases); CI leaves out the slow sections:
#              '9.*,12.*,13.*' (247 cases left)
#   --expect   the number of cases the run must report (default 517)
#
# Environment: as run.sh (AUTOBAHN_SITE, AUTOBAHN_PYTHON, AUTOBAHN_TIMEOUT).
# Exits non-zero if the install, the run or the check fails.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$HERE/common.sh"

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

CLIENT="" OUT="" EXCLUDE="" EXPECT=517
while [[ $# -gt 0 ]]; do
    case "$1" in
        --client) CLIENT="${2:?--client needs a value}"; shift 2 ;;
        --out) OUT="${2:?--out needs a value}"; shift 2 ;;
        --exclude) EXCLUDE="${2:?--exclude needs a value}"; shift 2 ;;
        --expect) EXPECT="${2:?--expect needs a value}"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "run-client.sh: unknown argument: $1" >&2; usage ;;
    esac
done
[[ -n "$CLIENT" && -n "$OUT" ]] || usage
[[ -x "$CLIENT" ]] || { echo "run-client.sh: $CLIENT is not an executable" >&2; exit 2; }

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SITE="${AUTOBAHN_SITE:-${AUTOBAHN_HOME:-$(dirname "$OUT")/autobahn-site}}"
REPORTS="$OUT/reports"
SPEC="$OUT/spec.json"
LOG="$OUT/wstest.log"
TIMEOUT="${AUTOBAHN_TIMEOUT:-1200}"

"$HERE/install.sh" "$SITE"
PY="$(autobahn_python)"

rm -rf "$REPORTS"
mkdir -p "$REPORTS"
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
URL="ws://127.0.0.1:$PORT"

python3 - "$SPEC" "$URL" "$REPORTS" "$EXCLUDE" <<'PYEOF'
import json, sys
spec_path, url, reports, exclude = sys.argv[1:5]
spec = {
    "url": url,
    "outdir": reports,
    "cases": ["*"],
    "exclude-cases": [c.strip() for c in exclude.split(",") if c.strip()],
    "exclude-agent-cases": {},
}
with open(spec_path, "w") as f:
    json.dump(spec, f, indent=2)
    f.write("\n")
PYEOF

echo "autobahn: fuzzingserver on $URL (excluded: ${EXCLUDE:-none})"
(cd "$OUT" && exec "$PY" -E -s -B -u "$HERE/wstest.py" "$SITE" -m fuzzingserver -s "$SPEC") >"$LOG" 2>&1 &
SERVER=$!
stop_server() { kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }
trap stop_server EXIT
for _ in $(seq 1 100); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $PORT), 0.2)" 2>/dev/null; then
        break
    fi
    if ! kill -0 "$SERVER" 2>/dev/null; then
        echo "autobahn: the fuzzingserver exited; see $LOG" >&2
        tail -20 "$LOG" >&2
        exit 1
    fi
    sleep 0.2
done

t1=$SECONDS
set +e
timeout --kill-after=10 "$TIMEOUT" "$CLIENT" "$URL" duplex-client
rc=$?
set -e
echo "autobahn: client finished in $((SECONDS - t1)) s, exit $rc"
stop_server
trap - EXIT
if [[ $rc -ne 0 ]]; then
    echo "autobahn: the client failed (exit $rc)" >&2
    echo "autobahn: 0 passed, 1 failed"
    exit 1
fi
echo "autobahn: HTML report: $REPORTS/index.html"
python3 "$HERE/check.py" "$OUT" --deflate required --agent duplex-client --expect-cases "$EXPECT"
