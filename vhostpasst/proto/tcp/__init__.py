"""TCP: guest connections translated to host sockets, with no TCP stack of our own.

conn.py explains how (theory of operation); the handler the rest of vhostpasst uses is
TcpHandler, built from one class per concern: control.py (segments without data, ACK and
window), timers.py, from_guest.py, to_guest.py (socket events, data to the guest) with one
output module per kind of link (out_buf.py, out_vu.py), handler.py (listening sockets);
migrate.py moves established connections in a live migration (TCP_REPAIR).
"""

from vhostpasst.proto.tcp.conn import (
    ESTABLISHED,
    RTO_MIN,
    SEG_BATCH,
    SO_PEEK_OFF,
    TCP_INFO_LEN,
    WS_TO_TAP,
    Listener,
    TcpConn,
    seq_le,
    seq_lt,
)
from vhostpasst.proto.tcp.handler import TcpHandler

__all__ = ["ESTABLISHED", "RTO_MIN", "SEG_BATCH", "SO_PEEK_OFF", "TCP_INFO_LEN", "WS_TO_TAP",
           "Listener", "TcpConn", "TcpHandler", "seq_le", "seq_lt"]
