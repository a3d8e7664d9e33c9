#!/usr/bin/env bash
# `make install` / `make uninstall`: vhostpasst under $PREFIX (default /usr/local), as root.
#
#   $PREFIX/lib/vhostpasst/          a venv of its own holding the package (Debian's python3
#                                    refuses installs into the system: PEP 668)
#   $PREFIX/bin/vhostpasst, vhostpasta, vhostpasst-repair (the TCP_REPAIR helper)
#   $PREFIX/bin/passt, pasta         links, so libvirt, podman and qemu's -netdev passt find us
#                                    where they look (PATH); LINKS=no leaves them out
#   $PREFIX/share/man/man1/vhostpasst.1 (and vhostpasta.1)
#
# PYTHON picks the interpreter (default python3; Debian's needs python3-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/usr/local}
PYTHON=${PYTHON:-python3}
LINKS=${LINKS:-yes}
lib="$PREFIX/lib/vhostpasst"
bin="$PREFIX/bin"
man="$PREFIX/share/man/man1"

ours() {  # is $1 a link into our venv (so that uninstall removes nothing else)?
    [ -L "$1" ] && case "$(readlink "$1")" in "$lib"/*) return 0 ;; esac
    return 1
}

if [ "${1:-}" = --uninstall ]; then
    for name in vhostpasst vhostpasta vhostpasst-repair passt pasta; do
        if ours "$bin/$name"; then rm -f "$bin/$name"; fi
    done
    rm -f "$man/vhostpasst.1" "$man/vhostpasta.1"
    rm -rf "$lib"
    echo "vhostpasst removed from $PREFIX"
    exit 0
fi

"$PYTHON" -m venv --clear "$lib"
"$lib/bin/python" -m pip install -q --disable-pip-version-check .
mkdir -p "$bin" "$man"
ln -sfn "$lib/bin/vhostpasst" "$bin/vhostpasst"
ln -sfn "$lib/bin/vhostpasta" "$bin/vhostpasta"
ln -sfn "$lib/bin/vhostpasst-repair" "$bin/vhostpasst-repair"
if [ "$LINKS" = yes ]; then
    for name in passt pasta; do
        if [ -e "$bin/$name" ] && ! ours "$bin/$name"; then
            echo "install.sh: $bin/$name exists and is not ours: left alone" >&2
            continue
        fi
        target=vhostpasst
        [ "$name" = pasta ] && target=vhostpasta
        ln -sfn "$lib/bin/$target" "$bin/$name"
    done
fi
install -m 644 doc/vhostpasst.1 "$man/vhostpasst.1"
ln -sfn vhostpasst.1 "$man/vhostpasta.1"
echo "installed: $("$bin/vhostpasst" --version) in $PREFIX"
