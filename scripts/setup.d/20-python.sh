#!/usr/bin/env bash
# The project's own virtual environment (.venv), reinstalled only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${BEAMHUB_PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $($PY --version)" >&2
    "$PY" -m venv .venv
fi
stamp=".venv/.beamhub-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "installing Python packages into .venv (about a minute the first time)" >&2
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi
