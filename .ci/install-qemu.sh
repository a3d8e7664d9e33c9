#!/bin/sh
# Install what qemu-tests/ needs (run as root). Idempotent: safe to re-run.
#
# qemu 7.2 (Debian 12's own) crashes with vhost-user under TCG, so qemu must be 8 or newer:
# the distribution's own where it is (Debian 13, recent Ubuntu), else, on Debian 12, from
# bookworm-backports. Backports come from the mirror apt already uses (read from its sources),
# in a sources file of our own; the system's sources files are never edited.
set -eu

export DEBIAN_FRONTEND=noninteractive
QEMU_MIN=8
OUR_SOURCES=/etc/apt/sources.list.d/vhostpasst-backports.sources

if [ "$(id -u)" -ne 0 ]; then
	echo "install-qemu.sh: must run as root" >&2
	exit 1
fi

. /etc/os-release
codename=${VERSION_CODENAME:-}

# The major version of the qemu-system-x86 apt would install, or 0 if none.
candidate_major() {
	apt-cache policy qemu-system-x86 2>/dev/null |
		sed -n 's/^ *Candidate: *\([0-9]*:\)\{0,1\}\([0-9][0-9]*\)\..*/\2/p' | head -n1 |
		grep . || echo 0
}

. "$(dirname "$0")/../scripts/apt-mirror.sh"  # mirror_of SUITE

apt_has_suite() {
	grep -rqsw -- "$1" /etc/apt/sources.list /etc/apt/sources.list.d/
}

[ -n "$(apt-cache policy 2>/dev/null | grep -m1 http)" ] || apt-get update
release=""
if [ "$(candidate_major)" -lt "$QEMU_MIN" ]; then
	apt-get update
fi
if [ "$(candidate_major)" -lt "$QEMU_MIN" ]; then
	if [ "${ID:-}" != debian ] || [ -z "$codename" ]; then
		echo "install-qemu.sh: this system's qemu is older than $QEMU_MIN, which crashes with" \
			"vhost-user under TCG; install qemu $QEMU_MIN or newer by hand" >&2
		exit 1
	fi
	if ! apt_has_suite "$codename-backports"; then
		found=$(mirror_of "$codename") || {
			echo "install-qemu.sh: no apt source for $codename to take the mirror from" >&2
			exit 1
		}
		uri=${found%%|*}
		keyring=${found#*|}
		{
			echo "# Written by vhostpasst's .ci/install-qemu.sh: qemu >= $QEMU_MIN for its tests"
			echo "Types: deb"
			echo "URIs: $uri"
			echo "Suites: $codename-backports"
			echo "Components: main"
			[ -z "$keyring" ] || echo "Signed-By: $keyring"
		} >"$OUR_SOURCES"
		echo "install-qemu.sh: added $codename-backports from $uri in $OUR_SOURCES"
		apt-get update
	fi
	release="$codename-backports"
fi

apt-get install -y --no-install-recommends busybox-static cpio xz-utils zstd iproute2 iperf3
if [ -n "$release" ]; then
	apt-get install -y --no-install-recommends -t "$release" qemu-system-x86
else
	apt-get install -y --no-install-recommends qemu-system-x86
fi

qemu-system-x86_64 --version | head -n1
