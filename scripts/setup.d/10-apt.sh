#!/usr/bin/env bash
# Debian packages listed in scripts/apt-packages.txt, installed only when missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
mapfile -t wanted < <(sed -e 's/#.*//' -e 's/\s*$//' -e '/^$/d' scripts/apt-packages.txt)
missing=()
for extra in "$@"; do wanted+=("$extra"); done
for pkg in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
