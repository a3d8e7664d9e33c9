"""Domain names in RFC 1035 wire format, as the address services hand them to the guest.

DHCP's FQDN option (81) and DHCPv6's domain list (24) and NDP's DNSSL take whole names,
uncompressed; DHCP's search option (119, RFC 3397) compresses repeated suffixes. A name that
is not a valid domain name (an empty label, one over 63 bytes, more than 255 in all, or one
IDNA cannot encode) is left out, never sent broken.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable


def labels(name: str) -> list[bytes] | None:
    """A domain's labels, or None if it is not a valid DNS name (RFC 1035 §2.3.4)."""
    name = name.rstrip(".")
    if not name:
        return None
    try:
        out = [label.encode() if label.isascii() else label.encode("idna")
               for label in name.split(".")]
    except UnicodeError:
        return None
    if any(not 0 < len(label) < 64 for label in out):
        return None
    if sum(len(label) + 1 for label in out) + 1 > 255:
        return None
    return out


def dns_name(name: str) -> bytes | None:
    """`name` in uncompressed wire format, or None if it is not a valid domain name."""
    parts = labels(name)
    if parts is None:
        return None
    return b"".join(bytes((len(label),)) + label for label in parts) + b"\0"


def search_list(domains: Iterable[str]) -> bytes:
    """The valid names among `domains`, uncompressed, one after the other (DHCPv6 option 24,
    the DNSSL option's names)."""
    return b"".join(n for n in map(dns_name, domains) if n is not None)


def compressed_search_list(domains: Iterable[str]) -> bytes:
    """DHCP option 119 data (RFC 3397): the valid names, a suffix that was already written
    replaced by a compression pointer to it."""
    out = bytearray()
    seen: dict[tuple[bytes, ...], int] = {}  # suffix (lowercased labels) -> its offset
    for domain in domains:
        parts = labels(domain)
        if parts is None:
            continue
        for i in range(len(parts)):
            suffix = tuple(label.lower() for label in parts[i:])
            where = seen.get(suffix)
            if where is not None:
                out += struct.pack("!H", 0xC000 | where)
                break
            if len(out) < 0x4000:  # pointers only reach 14 bits
                seen[suffix] = len(out)
            out += bytes((len(parts[i]),)) + parts[i]
        else:
            out.append(0)
    return bytes(out)
