#!/bin/sh
# Install what qemu-tests/ needs on Debian 12 (bookworm). Idempotent: safe to re-run.
# qemu 7.2 from bookworm crashes with vhost-user under TCG, so qemu comes from
# bookworm-backports; everything else (busybox-static, cpio, compressors for the
# kernel modules) comes from bookworm itself.
set -eu

export DEBIAN_FRONTEND=noninteractive
SOURCES=/etc/apt/sources.list.d/debian.sources

if [ "$(id -u)" -ne 0 ]; then
	echo "install-qemu.sh: must run as root" >&2
	exit 1
fi

# Enable bookworm-backports on the stanza that lists "bookworm bookworm-updates",
# only if no apt source mentions it yet.
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
	if [ -f "$SOURCES" ] && grep -q '^Suites: bookworm bookworm-updates' "$SOURCES"; then
		sed -i '0,/^Suites: bookworm bookworm-updates/s//& bookworm-backports/' "$SOURCES"
	else
		echo 'deb http://deb.debian.org/debian bookworm-backports main' \
			>/etc/apt/sources.list.d/bookworm-backports.list
	fi
	updated=0
else
	updated=1
fi

# Refresh the indexes when we just added backports or they were never fetched.
if [ "$updated" -eq 0 ] || ! apt-cache policy qemu-system-x86 2>/dev/null | grep -q bookworm-backports; then
	apt-get update
fi

apt-get install -y --no-install-recommends busybox-static cpio xz-utils zstd iproute2 iperf3
apt-get install -y --no-install-recommends -t bookworm-backports qemu-system-x86

qemu-system-x86_64 --version | head -n1
