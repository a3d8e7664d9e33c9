"""The control socket's pieces without a daemon: rules and their wire layout (vhostpasst/ctl/
rules.py), the protocol's messages (protocol.py), the forwarder's transaction with binders
that record what they are asked (forwarder.py; the real listeners are exercised end to end
in tests/netns/test_control.py), the client's option semantics (client.py), and the server's
event-loop exchange over a UNIX socket in tmp_path (server.py)."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

import vhostpasst.ctl.client as client_module
from vhostpasst.config.fwd import parse_spec
from vhostpasst.core.loop import Loop
from vhostpasst.ctl import protocol
from vhostpasst.ctl.client import ClientError, apply_options
from vhostpasst.ctl.forwarder import Forwarder, Place, Side, To
from vhostpasst.ctl.protocol import PIF_HOST, PIF_SPLICE, Table
from vhostpasst.ctl.rules import (
    CAP_IFNAME,
    CAP_IPV4,
    CAP_IPV6,
    CAP_SCAN,
    CAP_TCP,
    CAP_UDP,
    DUAL_STACK_ANY,
    SCAN,
    WEAK,
    Rule,
    RuleError,
    check_table,
    inany,
    rules_from_forwards,
)
from vhostpasst.ctl.server import ControlServer

TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP
CAPS = CAP_IPV4 | CAP_IPV6 | CAP_TCP | CAP_UDP | CAP_IFNAME
PASTA_CAPS = CAPS | CAP_SCAN
EPHEMERAL = (49152, 65535)


def tcp(first: int, last: int | None = None, to: int | None = None, **kw: object) -> Rule:
    last = first if last is None else last
    flags = kw.pop("flags", DUAL_STACK_ANY)
    return Rule(TCP, first, last, first if to is None else to, flags=flags, **kw)  # type: ignore[arg-type]


# --- rules ---------------------------------------------------------------------------------


def test_rule_wire_layout_round_trip() -> None:
    rule = Rule(UDP, 5000, 5010, 6000, inany(IPv4Address("192.0.2.2")), ifname="up0", flags=WEAK)
    raw = rule.pack()
    assert len(raw) == 56
    assert raw[:16] == b"\0" * 10 + b"\xff\xff" + bytes([192, 0, 2, 2])
    assert raw[32:36] == b"up0\0" and raw[48:50] == (5000).to_bytes(2, "big")
    assert raw[54:] == bytes([UDP, WEAK])
    assert Rule.unpack(raw) == rule


def test_rule_unpack_refuses_an_unterminated_interface_name() -> None:
    raw = bytearray(tcp(80).pack())
    raw[32:48] = b"x" * 16
    with pytest.raises(RuleError, match="NUL"):
        Rule.unpack(bytes(raw))


def test_rule_text_as_passt_prints_it() -> None:
    assert str(tcp(22)) == "TCP [*]:22  =>  22"
    assert str(tcp(22, 80, 32)) == "TCP [*]:22-80  =>  32-90"
    v4 = Rule(UDP, 53, 53, 53, inany(IPv4Address("192.0.2.2")), ifname="up0")
    assert str(v4) == "UDP [192.0.2.2]%up0:53  =>  53"
    assert str(tcp(1, 100, flags=DUAL_STACK_ANY | WEAK | SCAN)) == (
        "TCP [*]:1-100  =>  1-100  (best effort) (auto-scan)")


def test_rules_from_forwards_split_as_passt_does() -> None:
    got = rules_from_forwards(parse_spec("5-25,~10-20"), TCP, CAPS, EPHEMERAL)
    assert [(r.first, r.last) for r in got] == [(5, 9), (21, 25)]
    auto = rules_from_forwards(parse_spec("auto", mode="pasta"), UDP, PASTA_CAPS, EPHEMERAL)
    assert [(r.first, r.last, r.flags) for r in auto] == [
        (1, 49151, DUAL_STACK_ANY | WEAK | SCAN)]
    addr = rules_from_forwards(parse_spec("[2001:db8::2]/8080:80"), TCP, CAPS, EPHEMERAL)
    assert addr == [Rule(TCP, 8080, 8080, 80, IPv6Address("2001:db8::2"))]
    ns = rules_from_forwards(parse_spec("53", option="-U", mode="pasta", allow_prefix=False),
                             UDP, PASTA_CAPS, EPHEMERAL, splice=True)
    assert ns == [Rule(UDP, 53, 53, 53, ifname="lo", flags=DUAL_STACK_ANY)]
    only4 = rules_from_forwards(parse_spec("80"), TCP, CAP_IPV4 | CAP_TCP, EPHEMERAL)
    assert only4 == [Rule(TCP, 80, 80, 80, inany(IPv4Address("0.0.0.0")))]
    assert rules_from_forwards(parse_spec("none"), TCP, CAPS, EPHEMERAL) == []


@pytest.mark.parametrize("rules, caps, message", [
    ([tcp(10, 20), tcp(15)], CAPS, "conflict"),
    ([tcp(0, 5)], CAPS, "from port 0"),
    ([tcp(65530, 65535, to=65531)], CAPS, "to port 0"),
    ([tcp(20, 10)], CAPS, "invalid port range"),
    ([tcp(80, flags=0x80)], CAPS, "invalid flags"),
    ([tcp(80)], CAPS & ~CAP_IPV6, "IPv6 not enabled"),
    ([tcp(80)], CAPS & ~CAP_TCP, "TCP not enabled"),
    ([Rule(1, 80, 80, 80, flags=DUAL_STACK_ANY)], CAPS, "unsupported protocol"),
    ([tcp(80, flags=DUAL_STACK_ANY | SCAN)], CAPS, "only allowed for pasta"),
    ([tcp(80, addr=IPv6Address("2001:db8::2"))], CAPS, "non-wildcard"),
    ([tcp(80, taddr=IPv6Address("2001:db8::9"))], CAPS, "dual stack forward to IPv6"),
    ([tcp(80, addr=inany(IPv4Address("0.0.0.0")), taddr=IPv6Address("2001:db8::9"), flags=0)],
     CAPS, "families differ"),
    ([tcp(80, taddr=IPv6Address("ff02::1"), flags=0)], CAPS, "multicast target"),
    ([tcp(p) for p in range(1, 257)], CAPS, "too many rules"),
])
def test_check_table_refuses(rules: list[Rule], caps: int, message: str) -> None:
    with pytest.raises(RuleError, match=message):
        check_table(rules, caps)


def test_a_target_address_travels_and_is_forwarded_to() -> None:
    """-t 0.0.0.0/8080:192.0.2.9/80 (config/fwd.py) as passt's rule, and its listener's
    target (an IPv4-only daemon: `8080:192.0.2.9/80` needs no listening address)."""
    caps4 = CAP_IPV4 | CAP_TCP
    rules = rules_from_forwards(parse_spec("8080:192.0.2.9/80"), TCP, caps4, EPHEMERAL)
    assert [str(r) for r in rules] == ["TCP [0.0.0.0]:8080  =>  192.0.2.9:80"]
    assert Rule.unpack(rules[0].pack()) == rules[0]
    binder = RecordingBinder()
    fwd = Forwarder([Side(PIF_HOST, "HOST", caps4, {TCP: binder}, ())])
    fwd.replace({PIF_HOST: tuple(rules)})
    assert list(binder.open.values()) == [((False, None, None, 8080),
                                           (80, IPv4Address("192.0.2.9")))]
    side = Side(PIF_SPLICE, "SPLICE", caps4, {TCP: RecordingBinder()}, (), targets=False)
    with pytest.raises(RuleError, match="SPLICE: target addresses"):
        Forwarder([side]).replace({PIF_SPLICE: tuple(rules)})


def test_check_table_allows_the_same_ports_on_different_addresses() -> None:
    a = Rule(TCP, 80, 80, 80, inany(IPv4Address("192.0.2.2")))
    b = Rule(TCP, 80, 80, 80, IPv6Address("2001:db8::2"))
    assert check_table([a, b, Rule(UDP, 80, 80, 80, flags=DUAL_STACK_ANY)], CAPS)
    # an unspecified address covers its own family only (passt: inany_matches)
    any4 = Rule(TCP, 80, 80, 80, inany(IPv4Address("0.0.0.0")))
    assert check_table([any4, b], CAPS)
    with pytest.raises(RuleError, match="conflict"):
        check_table([any4, a], CAPS)


def test_an_ipv4_only_table_keeps_the_sockets_it_started_with() -> None:
    """-t 80 with IPv4 only: the rule says 0.0.0.0, the socket is "any address"; the same
    table sent back changes nothing."""
    caps4 = CAP_IPV4 | CAP_TCP
    rules = tuple(rules_from_forwards(parse_spec("80"), TCP, caps4, EPHEMERAL))
    binder = RecordingBinder(existing=[((False, None, None, 80), 80)])
    fwd = Forwarder([Side(PIF_HOST, "HOST", caps4, {TCP: binder}, rules)])
    assert fwd.replace({PIF_HOST: rules}) == "1 rules, 0 sockets opened, 0 closed, 0 retargeted"


# --- protocol ------------------------------------------------------------------------------


def test_hello_and_tables_round_trip() -> None:
    tables = [Table(PIF_HOST, "HOST", CAPS, (tcp(80), tcp(443))),
              Table(PIF_SPLICE, "SPLICE", CAPS, ())]
    data = protocol.hello() + protocol.encode_tables(tables)
    assert data[:8] == b"basil:s\0" and data[8:12] == (2).to_bytes(4, "big")
    protocol.check_hello(data[:protocol.HELLO_SIZE])
    reader = protocol.TableReader()
    body = data[protocol.HELLO_SIZE:]
    for i in range(len(body) - 1):  # byte by byte: incomplete until the end byte
        assert reader.feed(body[i:i + 1]) is None
    assert reader.feed(body[-1:]) == tables


def test_decode_update_incomplete_complete_and_refused() -> None:
    update = protocol.encode_update({PIF_HOST: (tcp(80),)})
    for cut in range(len(update)):
        assert protocol.decode_update(update[:cut], {PIF_HOST}) is None
    assert protocol.decode_update(update, {PIF_HOST}) == {PIF_HOST: (tcp(80),)}
    with pytest.raises(protocol.ProtocolError, match="non-existent"):
        protocol.decode_update(update, {PIF_SPLICE})
    with pytest.raises(protocol.ProtocolError, match="maximum"):
        protocol.decode_update(bytes([PIF_HOST]) + (256).to_bytes(4, "big"), {PIF_HOST})
    with pytest.raises(protocol.ProtocolError, match="twice"):
        twice = update[:-1] + update
        protocol.decode_update(twice, {PIF_HOST})
    assert len(protocol.encode_update({PIF_HOST: tuple(tcp(p) for p in range(1, 256))})) \
        == protocol.update_max(1)


def test_result_round_trip() -> None:
    data = protocol.result(errno.EADDRINUSE, "HOST: cannot listen")
    for cut in range(len(data)):
        assert protocol.decode_result(data[:cut]) is None
    assert protocol.decode_result(data) == (errno.EADDRINUSE, "HOST: cannot listen")


# --- forwarder -----------------------------------------------------------------------------


class RecordingBinder:
    """Hands out numbered handles; ports in `busy` fail with EADDRINUSE, and so does a port
    one of its sockets holds (as the kernel: on its address, or on every one for a wildcard)."""

    def __init__(self, busy: Iterable[int] = (), existing: Iterable[tuple[Place, int]] = ()):
        self.busy = set(busy)
        self.open: dict[int, tuple[Place, To]] = {}
        self.next = 0
        for place, to_port in existing:
            self.bind(place, (to_port, None))

    def bind(self, place: Place, to: To) -> object:
        held = any(p[0] == place[0] and p[3] == place[3] and None in (p[1], place[1])
                   for p, _ in self.open.values())
        if place[3] in self.busy or held:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        self.next += 1
        self.open[self.next] = (place, to)
        return self.next

    def unbind(self, handle: object) -> None:
        assert isinstance(handle, int)
        del self.open[handle]

    def retarget(self, handle: object, to: To) -> None:
        assert isinstance(handle, int)
        self.open[handle] = (self.open[handle][0], to)

    def existing(self) -> Iterable[tuple[Place, To, object]]:
        return [(place, to, h) for h, (place, to) in self.open.items()]

    def ports(self) -> set[tuple[bool, int, int]]:
        return {(p[0], p[3], to[0]) for p, to in self.open.values()}


def _forwarder(binder: RecordingBinder, rules: tuple[Rule, ...] = ()) -> Forwarder:
    return Forwarder([Side(PIF_HOST, "HOST", CAPS, {TCP: binder}, rules)])


def test_forwarder_adopts_then_opens_closes_and_retargets() -> None:
    start = [((six, None, None, 80), 80) for six in (False, True)]
    binder = RecordingBinder(existing=start)
    fwd = _forwarder(binder, (tcp(80),))
    fwd.replace({PIF_HOST: (tcp(80, to=8080), tcp(81))})
    assert binder.ports() == {(False, 80, 8080), (True, 80, 8080), (False, 81, 81),
                              (True, 81, 81)}
    assert binder.next == 4  # port 80 kept its sockets: retargeted, not reopened
    fwd.replace({PIF_HOST: ()})
    assert binder.open == {} and fwd.tables()[0].rules == ()


def test_forwarder_rolls_back_when_a_port_cannot_be_bound() -> None:
    binder = RecordingBinder(busy={82})
    fwd = _forwarder(binder)
    fwd.replace({PIF_HOST: (tcp(80),)})
    before = dict(binder.open)
    with pytest.raises(OSError, match="TCP 0.0.0.0 port 82: Address already in use"):
        fwd.replace({PIF_HOST: (tcp(81), tcp(82))})
    assert binder.open == before and fwd.tables()[0].rules == (tcp(80),)
    # best effort: a busy port is skipped, the rest is applied
    fwd.replace({PIF_HOST: (tcp(81, 82, flags=DUAL_STACK_ANY | WEAK),)})
    assert binder.ports() == {(False, 81, 81), (True, 81, 81)}


def test_forwarder_frees_a_port_its_dropped_wildcard_holds() -> None:
    binder = RecordingBinder(busy={99})
    fwd = _forwarder(binder)
    fwd.replace({PIF_HOST: (tcp(80),)})
    one = Rule(TCP, 80, 80, 80, inany(IPv4Address("192.0.2.2")))
    before = dict(binder.open)
    with pytest.raises(OSError, match="port 99"):  # the wildcard comes back
        fwd.replace({PIF_HOST: (one, tcp(99))})
    assert binder.ports() == {(False, 80, 80), (True, 80, 80)}
    assert set(binder.open.values()) == set(before.values())
    fwd.replace({PIF_HOST: (one,)})
    assert [p for p, _ in binder.open.values()] == [(False, IPv4Address("192.0.2.2"), None, 80)]


def test_forwarder_refuses_an_invalid_table_and_changing_auto_rules() -> None:
    binder = RecordingBinder()
    auto = tcp(1, 49151, flags=DUAL_STACK_ANY | WEAK | SCAN)
    fwd = Forwarder([Side(PIF_HOST, "HOST", PASTA_CAPS, {TCP: binder}, (auto,))])
    with pytest.raises(RuleError, match="HOST: .*conflict"):
        fwd.replace({PIF_HOST: (auto, tcp(80))})
    with pytest.raises(RuleError, match="auto"):  # no scanner to stop
        fwd.replace({PIF_HOST: ()})
    fwd.replace({PIF_HOST: (auto, tcp(50000))})  # auto stays, its listeners are the scanner's
    assert binder.ports() == {(False, 50000, 50000), (True, 50000, 50000)}


class RecordingScan:
    """A scanner direction: its listeners live in `binder` while it runs."""

    def __init__(self, rules: tuple[Rule, ...], binder: RecordingBinder, port: int) -> None:
        self.rules = rules
        self.binder, self.port = binder, port
        self.handle: object | None = None
        self.resume()

    def stop(self) -> None:
        assert self.handle is not None
        self.binder.unbind(self.handle)
        self.handle = None

    def resume(self) -> None:
        self.handle = self.binder.bind((False, None, None, self.port), (self.port, None))


def test_forwarder_stops_and_resumes_auto_directions() -> None:
    binder = RecordingBinder(busy={99})
    auto = tcp(1, 49151, flags=DUAL_STACK_ANY | WEAK | SCAN)
    side = Side(PIF_HOST, "HOST", PASTA_CAPS, {TCP: binder}, (auto,))
    scan = RecordingScan((auto,), binder, 8080)  # the scanner forwards 8080 now
    side.scans[TCP] = scan
    fwd = Forwarder([side])
    side.sockets.clear()  # the scanner's listener is not the table's
    # an explicit rule for the port the scanner holds: it stops first, and comes back on failure
    with pytest.raises(OSError, match="port 99"):
        fwd.replace({PIF_HOST: (tcp(8080), tcp(99))})
    assert scan.handle is not None and fwd.tables()[0].rules == (auto,)
    fwd.replace({PIF_HOST: (tcp(8080),)})
    assert scan.handle is None and binder.ports() == {(False, 8080, 8080), (True, 8080, 8080)}
    with pytest.raises(RuleError, match="restored to those given at start"):
        fwd.replace({PIF_HOST: (tcp(1, 100, flags=DUAL_STACK_ANY | WEAK | SCAN),)})
    fwd.replace({PIF_HOST: (auto,)})  # `-t auto` again
    assert scan.handle is not None and fwd.tables()[0].rules == (auto,)


# --- client --------------------------------------------------------------------------------


def _tables() -> list[Table]:
    return [Table(PIF_HOST, "HOST", CAPS, (tcp(80),)), Table(PIF_SPLICE, "SPLICE", CAPS, ())]


def test_client_options_in_order() -> None:
    assert apply_options(_tables(), [("-t", "8080")]) == {PIF_HOST: [tcp(8080)], PIF_SPLICE: []}
    assert apply_options(_tables(), [("mode", "add"), ("-t", "81")])[PIF_HOST] == [
        tcp(80), tcp(81)]
    got = apply_options(_tables(), [("mode", "del"), ("-t", "80"), ("mode", "add"),
                                    ("-T", "53")])
    assert got == {PIF_HOST: [], PIF_SPLICE: [tcp(53, ifname="lo")]}
    assert apply_options(_tables(), [("clear", "HOST")])[PIF_HOST] == []


@pytest.mark.parametrize("ops, message", [
    ([("mode", "add"), ("-t", "80")], "conflict"),
    ([("mode", "del"), ("-t", "81")], "Couldn't find"),
    ([("mode", "del"), ("-t", "80-81")], "doesn't match"),
    ([("clear", "TAP")], "Unsupported pif name TAP"),
    ([("-t", "70000")], "out of range"),
])
def test_client_refuses(ops: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(ClientError, match=message):
        apply_options(_tables(), ops)


def test_client_needs_an_outbound_table_for_T() -> None:
    with pytest.raises(ClientError, match="no outbound interface"):
        apply_options(_tables()[:1], [("-T", "53")])


# --- server --------------------------------------------------------------------------------


def _server(tmp_path: Path, timeout: float = 0.3) -> tuple[Loop, ControlServer, RecordingBinder]:
    loop = Loop()
    binder = RecordingBinder(busy={99})
    server = ControlServer(loop, str(tmp_path / "ctl"), _forwarder(binder, ()),
                           lambda: b'{"flows": []}', timeout=timeout)
    return loop, server, binder


def _exchange(loop: Loop, path: str, update: bytes, limit: float = 5) -> bytes:
    """A client that reads the tables, sends `update` and reads to the end; the loop runs."""
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.setblocking(False)
    c.connect(path)
    got, sent, end = b"", False, time.monotonic() + limit
    while time.monotonic() < end:
        loop.run_once(0.05)
        try:
            chunk = c.recv(65536)
        except BlockingIOError:
            continue
        if not chunk:
            break
        got += chunk
        if not sent and got.endswith(b"\0"):
            c.sendall(update)
            sent = True
    c.close()
    return got


def test_server_applies_and_reports(tmp_path: Path) -> None:
    loop, server, binder = _server(tmp_path)
    try:
        header = len(protocol.hello()) + len(protocol.encode_tables(server.forwarder.tables()))
        got = _exchange(loop, server.path, protocol.encode_update({PIF_HOST: (tcp(81),)}))
        assert protocol.decode_result(got[header:]) == (
            0, "1 rules, 2 sockets opened, 0 closed, 0 retargeted")
        assert binder.ports() == {(False, 81, 81), (True, 81, 81)}
        header += 56  # the table now holds the rule
        got = _exchange(loop, server.path, protocol.encode_update({PIF_HOST: (tcp(99),)}))
        status, message = protocol.decode_result(got[header:]) or (0, "")
        assert status == errno.EADDRINUSE and "port 99" in message
        assert binder.ports() == {(False, 81, 81), (True, 81, 81)}
        got = _exchange(loop, server.path, bytes([protocol.QUERY_FLOWS]))
        assert got[header:] == protocol.length_prefixed(b'{"flows": []}')
    finally:
        server.close()
        loop.close()
    assert not (tmp_path / "ctl").exists()


def test_server_drops_a_silent_client_and_keeps_running(tmp_path: Path) -> None:
    loop, server, _ = _server(tmp_path, timeout=0.3)
    try:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(server.path)
        silent.sendall(bytes([PIF_HOST, 0]))  # half an update
        waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        waiting.setblocking(False)
        waiting.connect(server.path)  # served once the silent one is gone
        t0 = time.monotonic()
        slowest = 0.0
        while time.monotonic() - t0 < 0.5:  # past the silent client's timeout
            t = time.monotonic()
            loop.run_once(0.01)
            slowest = max(slowest, time.monotonic() - t)
        assert slowest < 0.2  # the loop never waited on the client
        deadline = time.monotonic() + 5
        got = b""
        while time.monotonic() < deadline and not got:
            loop.run_once(0.05)
            try:
                got = waiting.recv(65536)
            except BlockingIOError:
                pass
        assert got.startswith(b"basil:s\0")  # the next client was served
        silent.settimeout(1)
        data = silent.recv(65536)
        while data:
            data = silent.recv(65536)  # dropped: end of stream
        waiting.close()
        silent.close()
    finally:
        server.close()
        loop.close()


def test_server_refuses_a_path_in_use(tmp_path: Path) -> None:
    loop, server, _ = _server(tmp_path)
    try:
        with pytest.raises(OSError, match="in use"):
            ControlServer(loop, server.path, server.forwarder, lambda: b"")
    finally:
        server.close()
        loop.close()
    (tmp_path / "stale").touch()
    with pytest.raises(OSError):  # not a socket: left alone
        ControlServer(Loop(), str(tmp_path / "stale"), server.forwarder, lambda: b"")


def test_client_linked_as_pesto(tmp_path: Path) -> None:
    """Installed or linked as `pesto`, the client names itself so and takes the same options
    (and fails as pesto does when nothing listens at PATH)."""
    root = Path(client_module.__file__).resolve().parents[2]
    link = tmp_path / "pesto"
    link.symlink_to(client_module.__file__)
    env = {**os.environ, "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, str(link), "--help"], capture_output=True, text=True,
                       timeout=30, env=env)
    assert r.returncode == 0 and r.stdout.startswith("usage: pesto ")
    for option in ("--add", "--delete", "--clear", "--tcp-ports", "--udp-ports", "--tcp-ns",
                   "--udp-ns", "--show", "--debug", "--flows"):
        assert option in r.stdout
    r = subprocess.run([sys.executable, str(link), "-t", "80", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 1 and r.stderr.startswith("pesto: Failed to connect to ")
