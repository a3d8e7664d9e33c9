#!/bin/sh
# Install what qemu-tests/ needs (run as root). Idempotent: safe to re-run.
#
# qemu 7.2 (Debian 12's own) crashes with vhost-user under TCG, so qemu must be 8 or newer:
# the distribution's own where it is (Debian 13, recent Ubuntu), else, on Debian 12, from
# bookworm-backports. Backports come from the mirror apt already uses (read from its sources),
# in a sources file of our own; the system's sources files are never edited.
#
# libvirt the same way, for qemu-tests/test_libvirt.py: 11.1 or newer (vhostuser interfaces
# with the passt back end), the distribution's own where it is (Debian 13: 11.3), else on Debian
# 12 from bookworm-backports. Elsewhere an older libvirt is not installed: that test skips.
set -eu

export DEBIAN_FRONTEND=noninteractive
QEMU_MIN=8
LIBVIRT_MIN=11.1
LIBVIRT_PKGS="libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients"
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

# The MAJOR.MINOR version of package $1 apt would install, or 0.0 if none.
candidate() {
	apt-cache policy "$1" 2>/dev/null |
		sed -n 's/^ *Candidate: *\([0-9]*:\)\{0,1\}\([0-9][0-9]*\.[0-9][0-9]*\).*/\2/p' |
		head -n1 | grep . || echo 0.0
}

# True when version $1 (MAJOR.MINOR) is older than $2.
older() {
	[ "${1%%.*}" -lt "${2%%.*}" ] ||
		{ [ "${1%%.*}" -eq "${2%%.*}" ] && [ "${1#*.}" -lt "${2#*.}" ]; }
}

. "$(dirname "$0")/../scripts/apt-mirror.sh"  # mirror_of SUITE

apt_has_suite() {
	grep -rqsw -- "$1" /etc/apt/sources.list /etc/apt/sources.list.d/
}

# $codename-backports from the mirror apt already uses, in our own sources file (once).
add_backports() {
	apt_has_suite "$codename-backports" && return 0
	found=$(mirror_of "$codename") || {
		echo "install-qemu.sh: no apt source for $codename to take the mirror from" >&2
		exit 1
	}
	uri=${found%%|*}
	keyring=${found#*|}
	{
		echo "# Written by vhostpasst's .ci/install-qemu.sh: qemu >= $QEMU_MIN and" \
			"libvirt >= $LIBVIRT_MIN for its tests"
		echo "Types: deb"
		echo "URIs: $uri"
		echo "Suites: $codename-backports"
		echo "Components: main"
		[ -z "$keyring" ] || echo "Signed-By: $keyring"
	} >"$OUR_SOURCES"
	echo "install-qemu.sh: added $codename-backports from $uri in $OUR_SOURCES"
	apt-get update
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
	add_backports
	release="$codename-backports"
fi

apt-get install -y --no-install-recommends busybox-static cpio xz-utils zstd iproute2 iperf3
if [ -n "$release" ]; then
	apt-get install -y --no-install-recommends -t "$release" qemu-system-x86
else
	apt-get install -y --no-install-recommends qemu-system-x86
fi

libvirt_release=""
if older "$(candidate libvirt-daemon)" "$LIBVIRT_MIN" &&
	[ "${ID:-}" = debian ] && [ -n "$codename" ]; then
	add_backports
	libvirt_release="$codename-backports"
fi
if [ -n "$libvirt_release" ]; then
	# PKG/SUITE rather than -t: only libvirt (and what it needs from there) comes from
	# backports; -t would take systemd's packages from there too.
	apt-get install -y --no-install-recommends \
		$(for p in $LIBVIRT_PKGS; do echo "$p/$libvirt_release"; done)
elif older "$(candidate libvirt-daemon)" "$LIBVIRT_MIN"; then
	echo "install-qemu.sh: no libvirt >= $LIBVIRT_MIN here: qemu-tests/test_libvirt.py will skip"
else
	apt-get install -y --no-install-recommends $LIBVIRT_PKGS
fi

qemu-system-x86_64 --version | head -n1
! command -v libvirtd >/dev/null || libvirtd --version
