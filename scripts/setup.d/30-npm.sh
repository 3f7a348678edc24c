#!/usr/bin/env bash
# Node.js and npm, and the npm packages of package.json (configurable-http-proxy, oidc-provider).
# `beamhub up` installs its own copy into the state dir on first use (hub/up/npm.py, from
# the same pins: hub/up/node/ links to package.json and package-lock.json); this checkout-wide copy
# fills npm's cache, so those installs are quick and offline, and serves bench/hubproc.py's bare hub.
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
