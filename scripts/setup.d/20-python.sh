#!/usr/bin/env bash
# The project's own virtual environment (.venv), reinstalled only when pyproject.toml changes.
# Built from Debian's /usr/bin/python3 when it exists: each user's server and jobs run as her own
# Unix account (docs/architecture.md, tenancy), and a venv made from an interpreter inside root's
# 0700 home (pyenv) cannot be executed by those accounts. An existing .venv on another base is
# recreated. BEAMHUB_PYTHON overrides the choice.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -n "${BEAMHUB_PYTHON:-}" ]; then
    PY="$BEAMHUB_PYTHON"
elif [ -x /usr/bin/python3 ]; then
    PY=/usr/bin/python3
else
    PY=python3
fi
base() {  # the interpreter a venv's python resolves to
    readlink -f "$1"
}
if [ -x .venv/bin/python ] && [ "$(base .venv/bin/python)" != "$(base "$(command -v "$PY")")" ]; then
    echo "recreating .venv: it is based on $(base .venv/bin/python), not $PY" >&2
    echo "  (other accounts must be able to execute it: user servers run as their own users)" >&2
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $PY ($("$PY" --version))" >&2
    "$PY" -m venv .venv
fi
stamp=".venv/.beamhub-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "installing Python packages into .venv (about a minute the first time)" >&2
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test,docs]'
    # jsonschema[format-nongpl] brings rfc3987-syntax, whose import builds a Lark grammar: ~3 s
    # of CPU in every process that imports jsonschema (the hub, the gateway, the DSN), enough on
    # a busy 2-core machine to push a restarted service past its 10 s target. It only serves the
    # optional "iri" format check, which beamhub does not use.
    .venv/bin/pip uninstall -y -q rfc3987-syntax 2>/dev/null || true
    touch "$stamp"
fi
# With PYTHONDONTWRITEBYTECODE set (as on these machines) neither pip nor any import writes
# .pyc files, so every start of every service compiled its imports again (jupyterhub, dask,
# jsonschema: ~15 s on a busy 2-core machine). Compile the venv once after each install.
compiled=".venv/.beamhub-compiled"
if [ ! -f "$compiled" ] || [ "$stamp" -nt "$compiled" ]; then
    echo "compiling the venv's Python files once (bytecode for every service's start)" >&2
    .venv/bin/python -m compileall -q -j 0 .venv/lib >/dev/null 2>&1 || true
    touch "$compiled"
fi
# the accounts read the checkout and execute the venv: refuse a private checkout early
for dir in . .venv/bin; do
    if [ "$(( 0$(stat -c %a "$dir") & 05 ))" -ne 5 ]; then
        echo "warning: $(realpath "$dir") is not readable by other accounts (mode $(stat -c %a "$dir"));" \
             "user servers run as their own accounts: chmod o+rx it" >&2
    fi
done
