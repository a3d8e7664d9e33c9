#!/usr/bin/env bash
# Installs what vhostpasst's tests need on a fresh Debian 12 or 13 machine (run as root), and
# the project itself with its test extra in a virtual environment inside the checkout
# (.venv/, or $VENV): Debian's own python3 refuses `pip install` into the system
# (externally-managed-environment, PEP 668), and a venv keeps the machine's Python untouched.
# Idempotent: Debian packages already present are not fetched again, an existing venv is
# reused (and re-created if it was made by another interpreter that has since gone).
#
#   PYTHON=/usr/bin/python3 scripts/setup-debian.sh    # which interpreter makes the venv
#   VENV=/somewhere/else scripts/setup-debian.sh       # where it goes
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-debian.sh: must run as root (it installs Debian packages)" >&2
    exit 1
fi

# The tests' tools, then what building the cffi modules needs (a C compiler, the headers of
# the interpreter that makes the venv, libffi's) and what makes the venv itself.
debs=(busybox-static isc-dhcp-client tshark iproute2 socat procps libseccomp-dev strace
      gcc libc6-dev libffi-dev ca-certificates make
      clang libclang-rt-dev  # the C fuzz harnesses (fuzz/, tests/unit/test_fuzz_c.py)
      debootstrap)  # tests/netns/podman_root.py: the Debian 13 root podman runs in
if [ "$(command -v "$PYTHON")" = /usr/bin/python3 ] || [ ! -x "$(command -v "$PYTHON" || true)" ]; then
    # Debian's interpreter: its venv module, ensurepip and headers are separate packages
    debs+=(python3 python3-venv python3-dev)
fi
missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# A venv whose interpreter has gone (or that a half-finished run left without pip) is made anew.
if [ -e "$VENV" ] && ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "setup-debian.sh: $VENV is broken, making it again" >&2
    rm -rf "$VENV"
fi
if [ ! -e "$VENV" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
echo "setup-debian.sh: $("$VENV/bin/python" --version) in $VENV, $("$VENV/bin/vhostpasst" --version)"
