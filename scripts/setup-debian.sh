#!/usr/bin/env bash
# Installs what vhostpasst's tests need on a fresh Debian 12 machine (run as root).
# Idempotent: packages already present are not fetched again.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

debs=(busybox-static isc-dhcp-client tshark iproute2 socat procps libseccomp-dev strace)
missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'
