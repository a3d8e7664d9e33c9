#!/bin/sh
# Runs the README's set-up on a stock Debian root, as a new user would, and a smoke test there:
#
#   scripts/check-stock-debian.sh bookworm|trixie [ROOT_DIR]      (as root; minutes)
#
# The root is debootstrap's minbase (kept in ROOT_DIR, default .cache/stock-SUITE, and reused:
# it is wiped of our checkout each run, not rebuilt), with the package clients configured as on
# this machine (apt's mirror, read from its sources; pip's configuration) and nothing else but
# `make`, which the README's commands need. A clean copy of HEAD (git archive) goes into
# /root/vhostpasst there; then `make setup`, the daemon's --version, a namespace test (a DHCP
# lease through the stream socket and a TCP transfer) and `make demo` (a qemu guest over
# vhost-user) run inside it. The last result and command go in doc/install-check.md.
set -eu
cd "$(dirname "$0")/.."
suite=${1:?usage: $0 bookworm|trixie [ROOT_DIR]}
mkdir -p "${2:-.cache/stock-$suite}"
root=$(cd "${2:-.cache/stock-$suite}" && pwd)
here=$(pwd)
. scripts/apt-mirror.sh

if [ "$(id -u)" -ne 0 ]; then
	echo "check-stock-debian.sh: must run as root" >&2
	exit 1
fi
command -v debootstrap >/dev/null || apt-get install -y -q debootstrap

. /etc/os-release
found=$(mirror_of "$VERSION_CODENAME") || { echo "no apt source to take the mirror from" >&2; exit 1; }
mirror=${found%%|*}

if [ ! -x "$root/usr/bin/apt-get" ]; then
	rm -rf "$root"
	debootstrap --variant=minbase "$suite" "$root" "$mirror"
fi

cleanup() {
	for m in run dev/pts dev sys proc; do
		! mountpoint -q "$root/$m" || umount -l "$root/$m"
	done
	! mountpoint -q "$root" || umount -l "$root"
}
trap cleanup EXIT INT TERM
# the root a mount point of its own: `ip netns exec` remounts / as a slave there
mountpoint -q "$root" || mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/run"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# pip as configured on this machine (its index and certificates), nothing else of ours
[ ! -f /etc/pip.conf ] || cp /etc/pip.conf "$root/etc/pip.conf"
[ ! -d /etc/xdg/pip ] || { mkdir -p "$root/etc/xdg"; cp -r /etc/xdg/pip "$root/etc/xdg/"; }
# and the certificate authorities this machine adds (a TLS proxy's): ca-certificates in the
# root merges them into its bundle when the set-up installs it; until then the host's bundle
if [ -d /usr/local/share/ca-certificates ]; then
	mkdir -p "$root/usr/local/share/ca-certificates"
	cp -r /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
fi
f=/etc/ssl/certs/ca-certificates.crt
[ -e "$root$f" ] || { mkdir -p "$root${f%/*}"; cp "$f" "$root$f"; }

rm -rf "$root/root/vhostpasst"
mkdir -p "$root/root/vhostpasst"
git archive HEAD | tar -x -C "$root/root/vhostpasst"
pipenv=$(env | grep '^PIP_' | tr '\n' ' ' || true)

# Into the root by pivot_root in a mount namespace of its own, not chroot: the kernel refuses a
# new user namespace to a chrooted process, and the daemon's sandbox makes one (as passt's does).
mkdir -p "$root/.oldroot"
# shellcheck disable=SC2016
unshare --mount --propagation private sh -c '
	cd "$1" && pivot_root . .oldroot && cd / && umount -l /.oldroot && shift && exec "$@"' \
	pivot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root $pipenv sh -euc '
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q
	apt-get install -y -q --no-install-recommends make
	cd /root/vhostpasst
	echo "== $(. /etc/os-release; echo "$PRETTY_NAME"), $(python3 --version 2>&1 || echo "no python3 yet")"
	make setup
	.venv/bin/vhostpasst --version
	.venv/bin/python -m pytest -p no:cacheprovider -q tests/netns/test_e2e_stream.py \
		tests/netns/test_e2e_tcp.py -k "udhcpc_lease_carries or guest_to_remote or remote_to_guest"
	timeout 600 make demo
'
echo "check-stock-debian.sh: $suite passed ($(date -u +%F), HEAD $(git -C "$here" log -1 --format=%h))"
