"""Message codec: framing, fd passing, validation of sizes and fds."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio import message as m


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_header_layout():
    assert m.encode(m.Request.GET_FEATURES) == struct.pack("=III", 1, 1, 0)
    reply = m.encode_reply(m.Request.GET_FEATURES, m.encode_u64(5))
    assert reply[:12] == struct.pack("=III", 1, 0x5, 8)


def test_read_whole_message_with_fds(pair):
    a, b = pair
    r, w = os.pipe()
    m.send_message(a, m.encode(m.Request.SET_VRING_KICK, m.encode_u64(1)), [r])
    msg = m.MessageReader(b).read()
    assert msg is not None and msg.request == m.Request.SET_VRING_KICK
    assert msg.u64() == 1 and len(msg.fds) == 1
    assert m.validate(msg) == m.Request.SET_VRING_KICK
    msg.close_fds()
    os.close(r)
    os.close(w)


def test_partial_message_is_buffered(pair):
    a, b = pair
    reader = m.MessageReader(b)
    data = m.encode(m.Request.SET_VRING_NUM, m.encode_state(0, 256))
    a.send(data[:5])
    assert reader.read() is None
    a.send(data[5:14])
    assert reader.read() is None
    a.send(data[14:])
    msg = reader.read()
    assert msg is not None and msg.state() == (0, 256)


def test_two_messages_fds_stay_with_their_message(pair):
    a, b = pair
    r, w = os.pipe()
    m.send_message(a, m.encode(m.Request.GET_FEATURES))
    m.send_message(a, m.encode(m.Request.SET_VRING_CALL, m.encode_u64(0)), [w])
    reader = m.MessageReader(b)
    first, second = reader.read(), reader.read()
    assert first is not None and first.fds == []
    assert second is not None and len(second.fds) == 1
    second.close_fds()
    os.close(r)
    os.close(w)


def test_eof(pair):
    a, b = pair
    a.close()
    with pytest.raises(m.ConnectionClosed):
        m.MessageReader(b).read()


def test_oversized_payload_is_protocol_error(pair):
    a, b = pair
    a.send(struct.pack("=III", 1, 1, m.MAX_PAYLOAD + 1))
    with pytest.raises(m.ProtocolError):
        m.MessageReader(b).read()


def test_bad_version_is_protocol_error(pair):
    a, b = pair
    a.send(struct.pack("=III", 1, 2, 0))
    with pytest.raises(m.ProtocolError):
        m.MessageReader(b).read()


def test_too_many_fds_closed_and_refused(pair):
    a, b = pair
    pipes = [os.pipe() for _ in range(5)]
    fds = [fd for p in pipes for fd in p]  # 10 fds > MAX_FDS
    before = _open_fds()
    m.send_message(a, m.encode(m.Request.SET_OWNER), fds)
    with pytest.raises(m.RequestError):
        m.MessageReader(b).read()
    assert _open_fds() == before  # every received fd was closed
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("request_, payload, nfds", [
    (m.Request.GET_FEATURES, b"\0" * 8, 0),
    (m.Request.SET_FEATURES, b"\0" * 4, 0),
    (m.Request.SET_OWNER, b"", 1),
    (m.Request.SET_VRING_KICK, m.encode_u64(0), 0),  # no fd and no INVALID_FD bit
    (m.Request.SET_VRING_KICK, m.encode_u64(0x100), 1),  # fd despite INVALID_FD
    (m.Request.SET_VRING_CALL, m.encode_u64(1 << 40), 1),  # stray high bits
    (m.Request.SET_MEM_TABLE, struct.pack("=II", 2, 0) + b"\0" * 32, 1),
    (m.Request.SET_MEM_TABLE, struct.pack("=II", 0, 0), 0),
    (m.Request.SET_MEM_TABLE, struct.pack("=II", 9, 0) + b"\0" * 288, 0),
    (m.Request.SET_MEM_TABLE, struct.pack("=II", 1, 0) + b"\0" * 32, 2),
    (m.Request.ADD_MEM_REG, b"\0" * 40, 0),
    (m.Request.REM_MEM_REG, b"\0" * 40, 2),
    (m.Request.GET_CONFIG, struct.pack("=III", 0, 300, 0) + b"\0" * 300, 0),
    (m.Request.GET_CONFIG, struct.pack("=III", 0, 8, 0) + b"\0" * 4, 0),
    (99, b"", 0),
])
def test_validate_refuses(request_, payload, nfds):
    msg = m.Message(int(request_), m.VERSION, payload, list(range(100, 100 + nfds)))
    with pytest.raises(m.RequestError):
        m.validate(msg)


def test_validate_refuses_reply_flag():
    with pytest.raises(m.RequestError):
        m.validate(m.Message(m.Request.GET_FEATURES, m.VERSION | m.FLAG_REPLY, b""))


def test_mem_table_roundtrip():
    regions = [m.RegionDesc(0, 4096, 0x7000, 0), m.RegionDesc(1 << 32, 8192, 0x9000, 4096)]
    msg = m.Message(m.Request.SET_MEM_TABLE, m.VERSION, m.encode_mem_table(regions), [3, 4])
    assert m.validate(msg) == m.Request.SET_MEM_TABLE
    assert msg.mem_table() == regions


@settings(max_examples=300, deadline=None)
@given(request=st.integers(0, 60), flags=st.integers(0, 2**32 - 1),
       payload=st.binary(max_size=300), nfds=st.integers(0, 3))
def test_validate_never_crashes(request, flags, payload, nfds):
    msg = m.Message(request, flags, payload, list(range(100, 100 + nfds)))
    try:
        req = m.validate(msg)
    except m.RequestError:
        return
    # Whatever passed validation can be unpacked by its payload accessor.
    if req == m.Request.SET_MEM_TABLE:
        msg.mem_table()
    elif req in (m.Request.ADD_MEM_REG, m.Request.REM_MEM_REG):
        msg.mem_reg()
    elif req in (m.Request.GET_CONFIG, m.Request.SET_CONFIG):
        msg.config()
    elif req == m.Request.SET_VRING_ADDR:
        msg.vring_addr()
    elif len(payload) == 8:
        msg.u64()
        msg.state()
