# Sourced by .ci/install-qemu.sh and scripts/check-stock-debian.sh (POSIX sh): the mirror apt
# already uses, read from its sources, so that no package host's name is written anywhere.

# mirror_of SUITE: "URI|SIGNED-BY" of the first enabled source for SUITE, from the deb822 files
# (Types/URIs/Suites/Signed-By stanzas), else from the one-line sources.list files; status 1 if
# there is none. APT_ETC (default /etc/apt) is where apt's configuration is: tests set it.
mirror_of() {
	etc=${APT_ETC:-/etc/apt}
	for f in "$etc"/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		awk -v suite="$1" '
			function flush() {
				if (uri != "" && enabled && (" " suites " ") ~ (" " suite " ")) {
					print uri "|" keyring; found = 1; exit
				}
				uri = ""; suites = ""; keyring = ""; enabled = 1
			}
			BEGIN { enabled = 1 }
			/^[ \t]*$/ { flush(); next }
			/^URIs:/ { uri = $2 }
			/^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
			/^Signed-By:/ { keyring = $2 }
			/^Enabled:[ \t]*no/ { enabled = 0 }
			END { if (!found) flush() }' "$f"
	done | head -n1 | grep . && return 0
	cat "$etc"/sources.list "$etc"/sources.list.d/*.list 2>/dev/null |
		awk -v suite="$1" '$1 == "deb" {
			i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
			if ($(i + 1) == suite) { print $i "|"; exit } }' | grep .
}
