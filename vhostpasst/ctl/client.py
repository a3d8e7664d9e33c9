"""`vhostpasst-pesto` (or `pesto`, through a link): show and change the forwarding tables of
a running vhostpasst or passt/pasta through its control socket (-c PATH), with the options
of passt's pesto; and `--flows`, vhostpasst's read-only query of the flow table.

Options are applied in order to the tables read from the server, then the whole set of
tables is sent back (the server replaces them in one transaction and answers with a result,
which passt does not send). Without -A/-D, the first -t/-u (-T/-U) clears the HOST (SPLICE)
table first: `pesto -t 8080 PATH` leaves exactly port 8080 forwarded.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Callable, Sequence

from vhostpasst import __version__
from vhostpasst.config.errors import ConfigError
from vhostpasst.config.fwd import ephemeral_range, parse_spec
from vhostpasst.ctl import protocol
from vhostpasst.ctl.protocol import Table
from vhostpasst.ctl.rules import (
    CAP_SCAN,
    Rule,
    RuleError,
    check_rule,
    conflicts,
    rules_from_forwards,
)

TIMEOUT = 30.0  # per step; a daemon serving another client first may take its 10 s

HELP_EPILOG = """\
SPEC is as for vhostpasst -t: none, [ADDR][%IFNAME]/PORTS or PORTS, where PORTS is 'all'
(passt), 'auto' (pasta) or a comma-separated list of N[-M][:P[-Q]] and ~N[-M] items.
Without -A or -D, the first -t/-u (-T/-U) replaces the whole HOST (SPLICE) table.
--flows prints the daemon's live flow table and counters as one JSON document
(vhostpasst only).
"""


class ClientError(Exception):
    """Something to report and exit 1 for."""


def _tagged(option: str) -> Callable[[str], tuple[str, str]]:
    """An argparse type keeping which option gave the value (they apply in order)."""
    def tag(value: str) -> tuple[str, str]:
        return option, value
    return tag


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Configure a running vhostpasst "
                                "(or passt/pasta) instance through its control socket.",
                                epilog=HELP_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="PATH", help="the control socket (the daemon's -c PATH)")
    p.add_argument("-A", "--add", dest="ops", action="append_const", const=("mode", "add"),
                   help="add the specifiers that follow to the tables")
    p.add_argument("-D", "--delete", dest="ops", action="append_const", const=("mode", "del"),
                   help="delete the specifiers that follow from the tables")
    p.add_argument("-C", "--clear", dest="ops", action="append", metavar="PIF",
                   type=_tagged("clear"), help="clear the table of PIF (HOST, SPLICE)")
    for short, long_, what in (("-t", "--tcp-ports", "TCP to the guest or namespace"),
                               ("-u", "--udp-ports", "UDP to the guest or namespace"),
                               ("-T", "--tcp-ns", "TCP from the namespace to the host"),
                               ("-U", "--udp-ns", "UDP from the namespace to the host")):
        p.add_argument(short, long_, dest="ops", action="append", metavar="SPEC",
                       type=_tagged(short), help=f"forward {what}")
    p.add_argument("-s", "--show", action="store_true",
                   help="show the tables before and after the change")
    p.add_argument("-d", "--debug", action="store_true", help="print debugging messages")
    p.add_argument("--flows", action="store_true",
                   help="print the live flow table and counters as JSON (vhostpasst only)")
    p.add_argument("--version", action="version", version=f"{prog} (vhostpasst) {__version__}")
    return p


class Connection:
    """A blocking connection to the control socket, with a timeout on each step."""

    def __init__(self, path: str, timeout: float = TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise ClientError(f"Failed to connect to {path}: {e.strerror}") from None
        self.pending = b""

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            raise ClientError("timed out waiting for the server") from None
        except OSError as e:
            raise ClientError(f"error reading from the control socket: {e.strerror}") from None

    def read_tables(self) -> list[Table]:
        data = b""
        while len(data) < protocol.HELLO_SIZE:
            chunk = self._recv()
            if not chunk:
                raise ClientError("couldn't read server greeting")
            data += chunk
        try:
            protocol.check_hello(data[:protocol.HELLO_SIZE])
            reader = protocol.TableReader()
            rest = data[protocol.HELLO_SIZE:]
            while True:
                # the end byte ends the tables: stop there, keep nothing for later
                tables = reader.feed(rest)
                if tables is not None:
                    return tables
                rest = self._recv()
                if not rest:
                    raise ClientError("the server closed before sending its tables")
        except protocol.ProtocolError as e:
            raise ClientError(str(e)) from None

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise ClientError(f"error writing to the control socket: {e.strerror}") from None

    def read_all(self, limit: int) -> bytes:
        """Everything until the server closes (at most `limit` bytes)."""
        data = b""
        while len(data) <= limit:
            chunk = self._recv()
            if not chunk:
                return data
            data += chunk
        raise ClientError("the server sent too much")

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def show(tables: list[Table]) -> str:
    lines = []
    for t in tables:
        lines.append(f"  {t.name}")
        lines += [f"    {rule}" for rule in t.rules]
    return "\n".join(lines)


def apply_options(tables: list[Table], ops: Sequence[tuple[str, str]]) -> dict[int, list[Rule]]:
    """The tables after the options, in order (ClientError for one that cannot apply)."""
    rules = {t.pif: list(t.rules) for t in tables}
    by_name = {t.name: t for t in tables}
    inbound, outbound = by_name.get("HOST"), by_name.get("SPLICE")
    mode = "clear"
    cleared: set[int] = set()
    eph = ephemeral_range()
    for kind, value in ops:
        if kind == "mode":
            mode = value
            continue
        if kind == "clear":
            if value not in by_name:
                raise ClientError(f"Unsupported pif name {value}")
            rules[by_name[value].pif] = []
            cleared.add(by_name[value].pif)
            continue
        table = inbound if kind in ("-t", "-u") else outbound
        if table is None:
            side = "inbound" if kind in ("-t", "-u") else "outbound"
            raise ClientError(f"Can't use {kind}, no {side} interface")
        if mode == "clear" and table.pif not in cleared:
            rules[table.pif] = []
            cleared.add(table.pif)
        pasta = bool(table.caps & CAP_SCAN)
        try:
            spec = parse_spec(value, option=kind, mode="pasta" if pasta else "passt",
                              allow_prefix=kind in ("-t", "-u"))
        except ConfigError as e:
            raise ClientError(str(e)) from None
        proto = socket.IPPROTO_TCP if kind in ("-t", "-T") else socket.IPPROTO_UDP
        new = rules_from_forwards(spec, proto, table.caps, eph, splice=kind in ("-T", "-U"))
        for rule in new:
            if mode == "del":
                _delete(rules[table.pif], rule)
            else:
                _add(rules[table.pif], rule, table.caps)
    return rules


def _add(rules: list[Rule], rule: Rule, caps: int) -> None:
    try:
        check_rule(rule, caps)
    except RuleError as e:
        raise ClientError(f"Unable to add rule {rule}: {e}") from None
    for old in rules:
        if conflicts(rule, old):
            raise ClientError(f"Forwarding configuration conflict: {rule} versus {old}")
    rules.append(rule)


def _delete(rules: list[Rule], rule: Rule) -> None:
    for i, old in enumerate(rules):
        if old == rule:
            del rules[i]
            return
        if conflicts(rule, old):
            raise ClientError(f"Specifier {rule} conflicts with rule {old}, but doesn't "
                              "match it, can't delete")
    raise ClientError(f"Couldn't find forwarding rule to delete: {rule}")


def run(argv: Sequence[str], prog: str) -> int:
    args = _parser(prog).parse_args(argv)
    ops: list[tuple[str, str]] = args.ops or []
    conn = Connection(args.path)
    try:
        tables = conn.read_tables()
        if args.debug:
            for t in tables:
                print(f"{prog}: PIF {t.pif}: {t.name}, {len(t.rules)} rules, capabilities "
                      f"0x{t.caps:x}", file=sys.stderr)
        if args.flows:
            conn.send(bytes([protocol.QUERY_FLOWS]))
            data = conn.read_all(protocol.FLOWS_MAX + 4)
            try:
                doc = protocol.decode_length_prefixed(data, protocol.FLOWS_MAX)
            except protocol.ProtocolError as e:
                raise ClientError(str(e)) from None
            if doc is None:
                raise ClientError("no flow table from the server (not vhostpasst?)")
            print(json.dumps(json.loads(doc), indent=2, sort_keys=True))
            return 0
        if not ops:
            print(f"passt/pasta configuration ({args.path})")
            print(show(tables))
            return 0
        if args.show:
            print(f"Previous configuration ({args.path})")
            print(show(tables))
        updated = apply_options(tables, ops)
        if args.show:
            after = [Table(t.pif, t.name, t.caps, tuple(updated[t.pif])) for t in tables]
            print(f"Updated configuration ({args.path})")
            print(show(after))
        conn.send(protocol.encode_update({pif: tuple(r) for pif, r in updated.items()}))
        conn.sock.shutdown(socket.SHUT_WR)
        reply = conn.read_all(protocol.RESULT_SIZE + protocol.RESULT_MESSAGE_MAX)
        if not reply:
            return 0  # passt answers nothing
        try:
            result = protocol.decode_result(reply)
        except protocol.ProtocolError as e:
            raise ClientError(str(e)) from None
        if result is None:
            raise ClientError("truncated result from the server")
        status, message = result
        if status:
            raise ClientError(f"update refused ({os.strerror(status)}): {message}")
        if args.debug:
            print(f"{prog}: {message}", file=sys.stderr)
        return 0
    finally:
        conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    prog = os.path.basename(sys.argv[0]) or "vhostpasst-pesto"
    try:
        return run(sys.argv[1:] if argv is None else argv, prog)
    except ClientError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
