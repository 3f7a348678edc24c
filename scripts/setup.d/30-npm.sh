#!/usr/bin/env bash
# Node packages from package.json (configurable-http-proxy, the dev OpenID provider).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f package.json ] || exit 0
if ! command -v npm >/dev/null; then
    bash scripts/setup.d/10-apt.sh nodejs npm
fi
if [ ! -d node_modules ] || [ package.json -nt node_modules ]; then
    echo "installing npm packages" >&2
    npm install --no-audit --no-fund --loglevel=error
    touch node_modules
fi
