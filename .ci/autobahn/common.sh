# shellcheck shell=bash
# Shared settings for the Autobahn|Testsuite harness; sourced by install.sh and run.sh.

# shellcheck disable=SC2034  # used by the scripts that source this file
AUTOBAHN_VERSION="25.10.1"
AUTOBAHN_PY_VERSION="2.7.18"
# shellcheck disable=SC2034
AUTOBAHN_MARKER=".duplex-autobahn-install"

# Print the path of the CPython 2.7.18 interpreter, or an error and return 1.
# AUTOBAHN_PYTHON may point at another CPython 2.7 interpreter.
autobahn_python() {
    local py=""
    if [[ -n "${AUTOBAHN_PYTHON:-}" ]]; then
        py="$AUTOBAHN_PYTHON"
    elif command -v pyenv >/dev/null 2>&1; then
        py="$(PYENV_VERSION="$AUTOBAHN_PY_VERSION" pyenv which python 2>/dev/null || true)"
    fi
    if [[ -z "$py" ]]; then
        py="${PYENV_ROOT:-$HOME/.pyenv}/versions/$AUTOBAHN_PY_VERSION/bin/python"
    fi
    local got=""
    if [[ -x "$py" ]]; then
        got="$("$py" -E -s -c 'import platform; print(platform.python_implementation() + " " + platform.python_version())' 2>/dev/null || true)"
    fi
    case "$got" in
        "CPython 2.7."*) printf '%s\n' "$py" ;;
        *)
            echo "Autobahn needs CPython $AUTOBAHN_PY_VERSION under pyenv: 'PYENV_VERSION=$AUTOBAHN_PY_VERSION pyenv which python' found no working interpreter (tried '$py'${got:+, which is $got})." >&2
            echo "Install it with 'pyenv install $AUTOBAHN_PY_VERSION', or set AUTOBAHN_PYTHON to a CPython 2.7 interpreter." >&2
            return 1
            ;;
    esac
}
