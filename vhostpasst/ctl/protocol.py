"""The control-socket protocol of passt 2026-07 (version 2), spoken by its `pesto` client, and
the two messages vhostpasst adds to it. Pure: bytes in, values out; no sockets.

Exchange (every integer big-endian):

    server -> client   hello: magic "basil:s\\0", u32 version (2), u32 PIF_NAME_SIZE (128),
                       u32 IFNAMSIZ (16)
    server -> client   per table: u8 pif id, name[128] (NUL padded), u32 caps, u32 count,
                       count rules (rules.py); then u8 0 (no more tables)
    client -> server   per table to replace: u8 pif id, u32 count, count rules; then u8 0

The client may also send nothing and close: it only read the tables (`pesto PATH`).

Our additions, which passt's `pesto` never sends and ignores when it does not expect them:
- after the client's tables, the server answers a RESULT: magic "basil:r\\0", u32 status
  (0: applied; otherwise an errno value), u32 length, that many bytes of UTF-8 message.
  passt's pesto has shut the socket down by then (the write fails quietly); our client
  reads it, and reports success without it when the server is passt (end of stream).
- instead of tables, a client may send the single byte QUERY_FLOWS (255: never a pif id);
  the server answers u32 length and that many bytes of one JSON document (flows.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vhostpasst.ctl.rules import MAX_RULES, RULE_SIZE, Rule, RuleError

MAGIC = b"basil:s\0"
RESULT_MAGIC = b"basil:r\0"
VERSION = 2
PIF_NAME_SIZE = 128
IFNAMSIZ = 16
PIF_NONE = 0
QUERY_FLOWS = 255
RESULT_MESSAGE_MAX = 4096
FLOWS_MAX = 64 << 20  # the largest JSON document a client accepts

PIF_HOST = 1  # passt's pif ids and names (pif.h)
PIF_SPLICE = 3
PIF_NAMES = {PIF_HOST: "HOST", PIF_SPLICE: "SPLICE"}

_HELLO = struct.Struct("!8sIII")
_PIF_INFO = struct.Struct(f"!{PIF_NAME_SIZE}sII")
_RESULT = struct.Struct("!8sII")
_U32 = struct.Struct("!I")
HELLO_SIZE = _HELLO.size
RESULT_SIZE = _RESULT.size


def update_max(tables: int) -> int:
    """The largest update a client can send for `tables` tables: each full, then the end."""
    return tables * (1 + _U32.size + MAX_RULES * RULE_SIZE) + 1


class ProtocolError(ValueError):
    """The peer broke the protocol; the connection ends."""


@dataclass(frozen=True)
class Table:
    pif: int
    name: str
    caps: int
    rules: tuple[Rule, ...]


def hello() -> bytes:
    return _HELLO.pack(MAGIC, VERSION, PIF_NAME_SIZE, IFNAMSIZ)


def check_hello(data: bytes) -> None:
    magic, version, name_size, ifnamsiz = _HELLO.unpack(data)
    if magic != MAGIC:
        raise ProtocolError("bad magic number from server")
    if version != VERSION:
        raise ProtocolError(f"unsupported server protocol version {version} (not {VERSION})")
    if name_size != PIF_NAME_SIZE or ifnamsiz != IFNAMSIZ:
        raise ProtocolError(f"server has unexpected sizes ({name_size}, {ifnamsiz})")


def encode_tables(tables: list[Table]) -> bytes:
    """The server's tables, then the end byte."""
    out = bytearray()
    for t in tables:
        out.append(t.pif)
        out += _PIF_INFO.pack(t.name.encode().ljust(PIF_NAME_SIZE, b"\0"), t.caps, len(t.rules))
        for rule in t.rules:
            out += rule.pack()
    out.append(PIF_NONE)
    return bytes(out)


def encode_update(tables: dict[int, tuple[Rule, ...]]) -> bytes:
    """The client's replacement tables by pif id, then the end byte."""
    out = bytearray()
    for pif, rules in tables.items():
        out.append(pif)
        out += _U32.pack(len(rules))
        for rule in rules:
            out += rule.pack()
    out.append(PIF_NONE)
    return bytes(out)


def decode_update(data: bytes, known: set[int]) -> dict[int, tuple[Rule, ...]] | None:
    """The client's tables if `data` holds them all (None: not yet complete). ProtocolError
    for a table we do not have, a repeated one or too many rules; RuleError (a ValueError
    too) for a rule that cannot even be decoded."""
    out: dict[int, tuple[Rule, ...]] = {}
    pos = 0
    while True:
        if pos >= len(data):
            return None
        pif = data[pos]
        pos += 1
        if pif == PIF_NONE:
            if pos != len(data):
                raise ProtocolError("data after the end of the update")
            return out
        if pif not in known:
            raise ProtocolError(f"received rules for non-existent table {pif}")
        if pif in out:
            raise ProtocolError(f"received table {pif} twice")
        if pos + _U32.size > len(data):
            return None
        (count,) = _U32.unpack_from(data, pos)
        pos += _U32.size
        if count > MAX_RULES:
            raise ProtocolError(f"received {count} rules (maximum {MAX_RULES})")
        end = pos + count * RULE_SIZE
        if end > len(data):
            return None
        out[pif] = tuple(Rule.unpack(data[p:p + RULE_SIZE]) for p in range(pos, end, RULE_SIZE))
        pos = end


class TableReader:
    """The client side: the server's tables, fed as they arrive (`feed()` returns them once
    complete, else None)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[Table] | None:
        self.buf += data
        tables: list[Table] = []
        pos = 0
        buf = self.buf
        while True:
            if pos >= len(buf):
                return None
            pif = buf[pos]
            if pif == PIF_NONE:
                if pos + 1 != len(buf):
                    raise ProtocolError("data after the server's tables")
                return tables
            if pos + 1 + _PIF_INFO.size > len(buf):
                return None
            raw_name, caps, count = _PIF_INFO.unpack_from(buf, pos + 1)
            if raw_name[-1]:
                raise ProtocolError("interface name was not NUL terminated")
            if count > MAX_RULES:
                raise ProtocolError("too many forwarding rules")
            start = pos + 1 + _PIF_INFO.size
            end = start + count * RULE_SIZE
            if end > len(buf):
                return None
            try:
                rules = tuple(Rule.unpack(bytes(buf[p:p + RULE_SIZE]))
                              for p in range(start, end, RULE_SIZE))
            except RuleError as e:
                raise ProtocolError(str(e)) from None
            name = raw_name.split(b"\0", 1)[0].decode("ascii", "replace")
            if any(t.pif == pif or t.name == name for t in tables):
                raise ProtocolError("received a duplicate table")
            tables.append(Table(pif, name, caps, rules))
            pos = end


def result(status: int, message: str) -> bytes:
    text = message.encode()[:RESULT_MESSAGE_MAX]
    return _RESULT.pack(RESULT_MAGIC, status, len(text)) + text


def decode_result(data: bytes) -> tuple[int, str] | None:
    """(status, message) once `data` holds the whole RESULT, else None."""
    if len(data) < RESULT_SIZE:
        return None
    magic, status, length = _RESULT.unpack_from(data)
    if magic != RESULT_MAGIC or length > RESULT_MESSAGE_MAX:
        raise ProtocolError("bad result from server")
    if len(data) < RESULT_SIZE + length:
        return None
    return status, data[RESULT_SIZE:RESULT_SIZE + length].decode("utf-8", "replace")


def length_prefixed(payload: bytes) -> bytes:
    return _U32.pack(len(payload)) + payload


def decode_length_prefixed(data: bytes, limit: int) -> bytes | None:
    if len(data) < _U32.size:
        return None
    (length,) = _U32.unpack_from(data)
    if length > limit:
        raise ProtocolError(f"reply of {length} bytes is too large")
    if len(data) < _U32.size + length:
        return None
    return data[_U32.size:_U32.size + length]
