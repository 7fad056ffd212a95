#!/usr/bin/env bash
# Run the Autobahn|Testsuite fuzzing client against a running WebSocket server
# and check the results.
#
# Usage: run.sh --url ws://127.0.0.1:PORT/mirror --out OUTDIR
#               --deflate required|unimplemented [--cases '*']
#
#   --url      echo endpoint of the server under test (the caller starts it)
#   --out      output folder: spec.json, wstest.log and reports/ (HTML + JSON)
#   --deflate  'required': sections 12/13 (permessage-deflate) must pass;
#              'unimplemented': they must report UNIMPLEMENTED
#   --cases    comma-separated case patterns (default '*', e.g. '1.*,2.1')
#
# Environment:
#   AUTOBAHN_SITE / AUTOBAHN_HOME  install folder for wstest
#                                  (default: OUTDIR/../autobahn-site)
#   AUTOBAHN_PYTHON                CPython 2.7 interpreter (default: pyenv 2.7.18)
#   AUTOBAHN_TIMEOUT               seconds before wstest is killed (default 1200)
#
# Exits non-zero if the install, the run or the check fails.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$HERE/common.sh"

usage() {
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

URL="" OUT="" DEFLATE="" CASES="*"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --url) URL="${2:?--url needs a value}"; shift 2 ;;
        --out) OUT="${2:?--out needs a value}"; shift 2 ;;
        --deflate) DEFLATE="${2:?--deflate needs a value}"; shift 2 ;;
        --cases) CASES="${2:?--cases needs a value}"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "run.sh: unknown argument: $1" >&2; usage ;;
    esac
done
[[ -n "$URL" && -n "$OUT" && -n "$DEFLATE" ]] || usage
case "$DEFLATE" in required|unimplemented) ;; *) echo "run.sh: --deflate must be required or unimplemented" >&2; exit 2 ;; esac
case "$URL" in ws://*|wss://*) ;; *) echo "run.sh: --url must be a ws:// or wss:// URL" >&2; exit 2 ;; esac

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SITE="${AUTOBAHN_SITE:-${AUTOBAHN_HOME:-$(dirname "$OUT")/autobahn-site}}"
REPORTS="$OUT/reports"
SPEC="$OUT/spec.json"
LOG="$OUT/wstest.log"
TIMEOUT="${AUTOBAHN_TIMEOUT:-1200}"

t0=$SECONDS
"$HERE/install.sh" "$SITE"
PY="$(autobahn_python)"
t_install=$((SECONDS - t0))

# Stale reports would be read as this run's results.
rm -rf "$REPORTS"
mkdir -p "$REPORTS"

python3 - "$SPEC" "$URL" "$REPORTS" "$CASES" <<'PYEOF'
import json, sys
spec_path, url, reports, cases = sys.argv[1:5]
spec = {
    "outdir": reports,
    "servers": [{"agent": "duplex", "url": url}],
    "cases": [c.strip() for c in cases.split(",") if c.strip()],
    "exclude-cases": [],
    "exclude-agent-cases": {},
    "options": {"failByDrop": False},
}
with open(spec_path, "w") as f:
    json.dump(spec, f, indent=2)
    f.write("\n")
PYEOF

echo "autobahn: running fuzzingclient against $URL (cases: $CASES, deflate: $DEFLATE)"
t1=$SECONDS
set +e
(cd "$OUT" && timeout --kill-after=10 "$TIMEOUT" \
    "$PY" -E -s -B -u "$HERE/wstest.py" "$SITE" -m fuzzingclient -s "$SPEC") >"$LOG" 2>&1
rc=$?
set -e
t_run=$((SECONDS - t1))
echo "autobahn: wstest finished in ${t_run} s (install step ${t_install} s), exit $rc; log: $LOG"

# The per-case lines go to the log only; show the rest.
grep -v '^Running test case ID ' "$LOG" | grep -v '^Cases = ' || true

if [[ $rc -ne 0 ]]; then
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        echo "autobahn: wstest timed out after ${TIMEOUT} s (AUTOBAHN_TIMEOUT)" >&2
    else
        echo "autobahn: wstest failed with exit $rc" >&2
    fi
    echo "autobahn: 0 passed, 1 failed"
    exit 1
fi

expect=()
n="$(sed -n 's/^Ok, will run \([0-9][0-9]*\) test cases.*/\1/p' "$LOG" | head -n 1)"
if [[ -n "$n" ]]; then
    expect=(--expect-cases "$n")
fi
if grep -q '^Connection to .* failed' "$LOG"; then
    echo "autobahn: could not connect to $URL; is the server running?"
fi

echo "autobahn: HTML report: $REPORTS/index.html"
python3 "$HERE/check.py" "$OUT" --deflate "$DEFLATE" --agent duplex ${expect[@]+"${expect[@]}"}
