"""The flow query (`vhostpasst-pesto --flows PATH`): the live flow table and the daemon's
counters as one JSON document, read-only.

    {"version": 1, "uptime": s, "flow_count": n, "flow_limit": n,
     "counters": {"guest_rx": n, "guest_tx": n, "dropped": n, "tcp": n, "udp": n,
                  "icmp": n},
     "link": {"connected": bool},
     "flows": [{"protocol": "tcp", "guest": "ADDR", "guest_port": n, "remote": "ADDR",
                "remote_port": n, "state": "ESTABLISHED", "bytes_from_guest": n,
                "bytes_to_guest": n, "age": s, "idle": s}, ...]}

The counters are those of --stats (Dispatcher.stat_counters): frames from (guest_rx) and to
(guest_tx) the guest, frames dropped, flows open by protocol. Addresses are as the guest sees
them (the far end after NAT). TCP byte counts are sequence distances (they wrap at 4 GiB;
null before the handshake completes); UDP and ICMP flows have no byte counts (null). Times
are seconds.
"""

from __future__ import annotations

import json
from typing import Any

from vhostpasst.core.flow import Flow, FlowTable
from vhostpasst.dispatch import Dispatcher
from vhostpasst.proto.icmp import PingFlow
from vhostpasst.proto.tcp.conn import CONNECTING, ESTABLISHED, SYN_ACK_SENT, SYN_SENT, TcpConn
from vhostpasst.proto.udp import UdpFlow

VERSION = 1
_TCP_STATES = {CONNECTING: "CONNECTING", SYN_ACK_SENT: "SYN_ACK_SENT", SYN_SENT: "SYN_SENT",
               ESTABLISHED: "ESTABLISHED"}
_SEQ = 1 << 32


def describe(flow: Flow, now: float) -> dict[str, Any]:
    times = {"age": round(now - flow.created, 3), "idle": round(now - flow.last_active, 3)}
    if isinstance(flow, TcpConn):
        done = flow.state == ESTABLISHED
        state = _TCP_STATES.get(flow.state, str(flow.state))
        if done and flow.tap_fin_rcvd:
            state += " (guest FIN)"
        return {"protocol": "tcp", "guest": str(flow.gaddr), "guest_port": flow.gport,
                "remote": str(flow.faddr), "remote_port": flow.fport, "state": state,
                "bytes_from_guest": (flow.seq_from_tap - flow.isn_tap - 1) % _SEQ if done
                else None,
                "bytes_to_guest": (flow.seq_to_tap - flow.isn - 1) % _SEQ if done else None,
                **times}
    if isinstance(flow, UdpFlow):
        return {"protocol": "udp", "guest": str(flow.gaddr), "guest_port": flow.gport,
                "remote": str(flow.faddr), "remote_port": flow.fport,
                "state": "inbound" if flow.listener is not None else "outbound",
                "bytes_from_guest": None, "bytes_to_guest": None, **times}
    if isinstance(flow, PingFlow):
        return {"protocol": "icmp", "guest": str(flow.gsrc), "guest_port": flow.ident,
                "remote": str(flow.gdst), "remote_port": None, "state": "echo",
                "bytes_from_guest": None, "bytes_to_guest": None, **times}
    return {"protocol": type(flow).__name__, "state": None, **times}


def snapshot(dispatcher: Dispatcher, flows: FlowTable, now: float,
             started: float) -> dict[str, Any]:
    entries = [describe(flow, now) for flow in flows]
    link = dispatcher.link
    return {
        "version": VERSION,
        "uptime": round(now - started, 3),
        "flow_count": len(entries),
        "flow_limit": flows.max_flows,
        "counters": {name: read() for name, read in dispatcher.stat_counters()},
        "link": {"connected": link is not None and link.connected},
        "flows": entries,
    }


def document(dispatcher: Dispatcher, now: float, started: float) -> bytes:
    assert dispatcher.ctx is not None
    return json.dumps(snapshot(dispatcher, dispatcher.ctx.flows, now, started),
                      sort_keys=True).encode()
