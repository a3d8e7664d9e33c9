"""portscan.py: /proc/net table parsing and listeners following the wanted set."""

from __future__ import annotations

import socket

from vhostpasst.pasta.portscan import TCP_LISTEN, UDP_UNCONNECTED, Direction, parse_proc_net

TCP = b"""  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0
   2: 0100007F:A000 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0
   3: garbage
"""
TCP6 = b"""  sl  local_address                         remote_address  st
   0: 00000000000000000000000001000000:0035 00000000000000000000000000000000:0000 0A 0
"""
UDP = b"""   sl  local_address rem_address   st
  1: 00000000:14E9 00000000:0000 07 00000000:00000000
  2: 0100007F:0035 0100007F:C000 01 00000000:00000000
"""


def test_parse_proc_net() -> None:
    assert parse_proc_net(TCP, TCP_LISTEN) == {8080, 22}
    assert parse_proc_net(TCP6, TCP_LISTEN) == {53}
    assert parse_proc_net(UDP, UDP_UNCONNECTED) == {5353}
    assert parse_proc_net(b"header only\n", TCP_LISTEN) == set()


def test_direction_follows_binds_and_unbinds() -> None:
    events: list[tuple[str, int, int]] = []

    def bind(family: int, port: int) -> tuple[int, int]:
        if port == 7:
            raise OSError(98, "in use")
        events.append(("bind", family, port))
        return family, port

    def unbind(h: tuple[int, int]) -> None:
        events.append(("unbind", *h))

    d = Direction("t", bind, unbind)
    fams = [socket.AF_INET, socket.AF_INET6]
    d.follow({80, 7}, fams)
    assert set(d.bound) == {80}  # 7 could not be bound: tried again next time
    d.follow({80, 443}, fams)
    d.follow({443}, fams)
    assert events == [("bind", socket.AF_INET, 80), ("bind", socket.AF_INET6, 80),
                      ("bind", socket.AF_INET, 443), ("bind", socket.AF_INET6, 443),
                      ("unbind", socket.AF_INET, 80), ("unbind", socket.AF_INET6, 80)]
    d.close()
    assert not d.bound and events[-1] == ("unbind", socket.AF_INET6, 443)
