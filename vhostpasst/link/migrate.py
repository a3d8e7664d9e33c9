"""vhostpasst's device state for live migration, version 1: what the vhost-user device hands
the front end on the source (virtio/devstate.py carries it) and takes back on the destination.

Theory of operation. The stream is ours alone: passt's state does not load here nor ours in
passt (the repair helper protocol is what the two share, vhostpasst/system/repair.py). It is

    header   "VHPS" magic, u16 version (1), u16 section count
    section  u16 type, u16 flags (0), u32 length, then `length` bytes of the type's body

all in network byte order. Version 1 knows one section type, GUEST (the MAC and addresses the
guest was seen using: core.nat.GuestAddrs), exactly once; connection sections (TCP_REPAIR
state) are to come as new types, each once per connection, and MAX_SECTIONS bounds them.

Loading is all or nothing: the whole stream is parsed and range-checked into a new value
before anything is applied, and any fault refuses it whole (StateError, the migration
fails): a wrong magic or version, a section count, type, flag or length out of range, a
duplicate or missing section, trailing bytes, a field set without its presence bit or a
value the dispatcher would never have learned (a multicast or zero MAC, a loopback,
multicast or unspecified address, a link-local address that is not link-local).
"""

from __future__ import annotations

import enum
import logging
import struct
from ipaddress import IPv4Address, IPv6Address

from vhostpasst.core.nat import GuestAddrs
from virtio.devstate import StateError

log = logging.getLogger(__name__)

MAGIC = b"VHPS"
VERSION = 1
MAX_SECTIONS = 1  # GUEST; connection sections will raise it
# The device's cap on the stream (virtio reads no more); room for connection queues later.
MAX_STATE_SIZE = 16 << 20

HEADER = struct.Struct("!4sHH")  # magic, version, section count
SECTION = struct.Struct("!HHI")  # type, flags, length
GUEST = struct.Struct("!B6s4s16s16s")  # present bits, MAC, IPv4, IPv6, IPv6 link-local


class Section(enum.IntEnum):
    GUEST = 1


# GUEST's presence bits
HAS_MAC = 1
HAS_ADDR4 = 2
HAS_ADDR6 = 4
HAS_ADDR6_LL = 8
_ALL = HAS_MAC | HAS_ADDR4 | HAS_ADDR6 | HAS_ADDR6_LL


def save(guest: GuestAddrs) -> bytes:
    """The state stream of `guest`."""
    present = 0
    for bit, value in ((HAS_MAC, guest.mac), (HAS_ADDR4, guest.addr4_seen),
                       (HAS_ADDR6, guest.addr6_seen), (HAS_ADDR6_LL, guest.addr6_ll_seen)):
        if value is not None:
            present |= bit
    body = GUEST.pack(present, guest.mac or bytes(6),
                      (guest.addr4_seen or IPv4Address(0)).packed,
                      (guest.addr6_seen or IPv6Address(0)).packed,
                      (guest.addr6_ll_seen or IPv6Address(0)).packed)
    return (HEADER.pack(MAGIC, VERSION, 1) + SECTION.pack(Section.GUEST, 0, len(body))
            + body)


def parse(data: bytes) -> GuestAddrs:
    """The guest addresses a state stream holds, every field checked; StateError if any
    part of it is wrong."""
    if len(data) > MAX_STATE_SIZE:
        raise StateError(f"state of {len(data)} bytes, more than {MAX_STATE_SIZE}")
    if len(data) < HEADER.size:
        raise StateError(f"state of {len(data)} bytes, shorter than its header")
    magic, version, count = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateError("not a vhostpasst state (a passt one does not load here)")
    if version != VERSION:
        raise StateError(f"state version {version}, this vhostpasst reads {VERSION}")
    if not 1 <= count <= MAX_SECTIONS:
        raise StateError(f"{count} sections")
    offset = HEADER.size
    guest: GuestAddrs | None = None
    for _ in range(count):
        if len(data) - offset < SECTION.size:
            raise StateError("state truncated in a section header")
        kind, flags, length = SECTION.unpack_from(data, offset)
        offset += SECTION.size
        if length > len(data) - offset:
            raise StateError(f"section of {length} bytes, {len(data) - offset} left")
        body = data[offset:offset + length]
        offset += length
        if flags:
            raise StateError(f"section flags {flags:#x}")
        if kind != Section.GUEST:
            raise StateError(f"unknown section type {kind}")
        if guest is not None:
            raise StateError("two GUEST sections")
        guest = _guest(body)
    if offset != len(data):
        raise StateError(f"{len(data) - offset} bytes after the last section")
    if guest is None:
        raise StateError("no GUEST section")
    return guest


def _guest(body: bytes) -> GuestAddrs:
    if len(body) != GUEST.size:
        raise StateError(f"GUEST section of {len(body)} bytes, not {GUEST.size}")
    present, mac, raw4, raw6, raw6_ll = GUEST.unpack(body)
    if present & ~_ALL:
        raise StateError(f"GUEST presence bits {present:#x}")
    guest = GuestAddrs()
    if present & HAS_MAC:
        if mac[0] & 1 or mac == bytes(6):
            raise StateError(f"guest MAC {mac.hex(':')} is not a unicast address")
        guest.mac = mac
    if present & HAS_ADDR4:
        addr4 = IPv4Address(raw4)
        if addr4.is_unspecified or addr4.is_loopback or addr4.is_multicast \
                or addr4 == IPv4Address("255.255.255.255"):
            raise StateError(f"guest address {addr4}")
        guest.addr4_seen = addr4
    if present & HAS_ADDR6:
        addr6 = IPv6Address(raw6)
        if addr6.is_unspecified or addr6.is_loopback or addr6.is_multicast:
            raise StateError(f"guest address {addr6}")
        guest.addr6_seen = addr6
    if present & HAS_ADDR6_LL:
        addr6_ll = IPv6Address(raw6_ll)
        if not addr6_ll.is_link_local:
            raise StateError(f"guest link-local address {addr6_ll}")
        guest.addr6_ll_seen = addr6_ll
    # what is absent must be zero: one spelling per state
    for bit, raw in ((HAS_MAC, mac), (HAS_ADDR4, raw4), (HAS_ADDR6, raw6),
                     (HAS_ADDR6_LL, raw6_ll)):
        if not present & bit and any(raw):
            raise StateError("a GUEST field set without its presence bit")
    return guest


def load(guest: GuestAddrs, data: bytes) -> None:
    """Apply a whole state stream to `guest` (what the source saw replaces what we saw; a
    field the source never saw leaves ours), or raise StateError and change nothing."""
    loaded = parse(data)
    for name in ("mac", "addr4_seen", "addr6_seen", "addr6_ll_seen"):
        value = getattr(loaded, name)
        if value is not None:
            setattr(guest, name, value)
    log.info("device state restored: guest MAC %s, IPv4 %s, IPv6 %s, link-local %s",
             loaded.mac.hex(":") if loaded.mac else "unknown",
             *(addr or "not seen" for addr in (loaded.addr4_seen, loaded.addr6_seen,
                                               loaded.addr6_ll_seen)))
