#!/usr/bin/env bash
# Install Autobahn|Testsuite (wstest) into DIR with CPython 2.7.18's pip.
#
# Usage: install.sh DIR
#
# Idempotent: if DIR holds a working install of the pinned version (marker
# file + a quick `wstest -a`), it does nothing. Otherwise it installs into a
# staging folder next to DIR and moves it into place, so an interrupted
# install never leaves a half-populated DIR behind.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$HERE/common.sh"

if [[ $# -ne 1 || -z "$1" ]]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi

PY="$(autobahn_python)" || exit 1

mkdir -p "$(dirname "$1")"
DIR="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
CONSTRAINTS="$HERE/constraints.txt"

# Marker content: any change (version, pins, interpreter) forces a reinstall.
expected_marker() {
    printf 'autobahntestsuite==%s\n' "$AUTOBAHN_VERSION"
    printf 'python=%s\n' "$PY"
    printf 'constraints-sha256=%s\n' "$(sha256sum "$CONSTRAINTS" | cut -d' ' -f1)"
}

is_installed() {
    [[ -f "$DIR/$AUTOBAHN_MARKER" ]] || return 1
    [[ "$(cat "$DIR/$AUTOBAHN_MARKER")" == "$(expected_marker)" ]] || return 1
    "$PY" -E -s -B "$HERE/wstest.py" "$DIR" -a 2>/dev/null | grep -qx "AutobahnTestSuite $AUTOBAHN_VERSION"
}

# Serialise concurrent installs into the same DIR.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$DIR.lock"
    flock 9
fi

if is_installed; then
    echo "autobahn: autobahntestsuite $AUTOBAHN_VERSION already installed in $DIR"
    exit 0
fi

# Never wipe a folder that is not ours.
if [[ -e "$DIR" && ! -f "$DIR/$AUTOBAHN_MARKER" ]] && [[ -n "$(ls -A "$DIR" 2>/dev/null)" ]]; then
    echo "autobahn: $DIR exists, is not empty and holds no $AUTOBAHN_MARKER; refusing to overwrite it" >&2
    exit 1
fi

STAGE="$(mktemp -d "$DIR.partial.XXXXXX")"
chmod 755 "$STAGE"
trap 'rm -rf "$STAGE" "$STAGE.log"' EXIT

echo "autobahn: installing autobahntestsuite $AUTOBAHN_VERSION into $DIR with $PY"
start=$SECONDS
# PIP_CONSTRAINT also reaches the isolated build env (wsaccel builds from sdist).
if ! PIP_CONSTRAINT="$CONSTRAINTS" PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONWARNINGS=ignore \
    "$PY" -E -s -m pip install --no-input --no-warn-script-location \
    --target "$STAGE" -c "$CONSTRAINTS" "autobahntestsuite==$AUTOBAHN_VERSION" \
    >"$STAGE.log" 2>&1; then
    echo "autobahn: pip install failed; last lines of $STAGE.log:" >&2
    tail -n 40 "$STAGE.log" >&2
    exit 1
fi
rm -f "$STAGE.log"

got="$("$PY" -E -s -B "$HERE/wstest.py" "$STAGE" -a 2>&1 || true)"
if ! grep -qx "AutobahnTestSuite $AUTOBAHN_VERSION" <<<"$got"; then
    echo "autobahn: installed wstest does not run:" >&2
    printf '%s\n' "$got" >&2
    exit 1
fi

expected_marker >"$STAGE/$AUTOBAHN_MARKER"
rm -rf "$DIR"
mv "$STAGE" "$DIR"
trap - EXIT
echo "autobahn: installed in $((SECONDS - start)) s"
