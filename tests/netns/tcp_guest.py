"""The guest of the TCP end-to-end tests (test_e2e_tcp, test_e2e_tcp_opts, test_isolation,
test_daemon_sandbox): its addresses and routes set as DHCP and a static IPv6 set-up would, the
daemon and relay started for it, and tcp_tool.py servers and clients in any namespace of the
sandbox."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.netns.sandbox import Sandbox, wait_until

TOOL = str(Path(__file__).resolve().parent / "tcp_tool.py")
GW4 = "192.0.2.1"
HOST4 = "192.0.2.2"
GW6 = "2001:db8::1"
HOST6 = "2001:db8::2"
OUR_MAC = "9a:55:9a:55:9a:55"
MIB = 1 << 20


def configure_guest(sandbox: Sandbox, ipv6: bool = True, mtu: int = 65520) -> None:
    """What a DHCP client would do (IPv4), plus a static IPv6 set-up (the router's
    neighbour entry is static so the test does not depend on NDP)."""
    sandbox.guest("ip", "link", "set", "tap0", "mtu", str(mtu), check=True)
    sandbox.guest("ip", "addr", "add", f"{HOST4}/24", "dev", "tap0", check=True)
    sandbox.guest("ip", "route", "add", "default", "via", GW4, check=True)
    if ipv6:
        sandbox.guest("ip", "-6", "addr", "add", f"{HOST6}/64", "dev", "tap0", "nodad",
                      check=True)
        sandbox.guest("ip", "-6", "neigh", "replace", GW6, "lladdr", OUR_MAC, "dev", "tap0",
                      "nud", "permanent", check=True)
        sandbox.guest("ip", "-6", "route", "replace", "default", "via", GW6, check=True)


def start(sandbox: Sandbox, *args: str, mtu: int = 65520, env: dict | None = None) -> None:
    sandbox.start_daemon(*args)
    sandbox.start_relay()
    configure_guest(sandbox, mtu=mtu)


def serve(sandbox: Sandbox, ns: str, addr: str, port: int, action: str,
          arg: str | None = None) -> Path:
    """Start a tcp_tool server in `ns`; returns its log path once it listens."""
    ready = sandbox.dir / f"srv-{ns[-1]}-{port}"
    cmd = [sys.executable, TOOL, "serve", addr, str(port), action, str(ready)]
    if arg is not None:
        cmd.append(arg)
    sandbox.popen_in(ns, *cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(ready.exists, 10, f"server on {addr}:{port}")
    return Path(str(ready) + ".log")


def client(sandbox: Sandbox, ns: str, addr: str, port: int, action: str, *args: object,
           timeout: float = 90) -> dict:
    r = sandbox.run_in(ns, sys.executable, TOOL, "connect", addr, str(port), action,
                       *map(str, args), timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr + sandbox.daemon_log()
    return json.loads(r.stdout)


def log_lines(path: Path, count: int = 1, timeout: float = 10) -> list[str]:
    def lines() -> list[str] | None:
        text = path.read_text() if path.exists() else ""
        got = text.splitlines()
        return got if len(got) >= count else None
    return wait_until(lines, timeout, f"{count} line(s) in {path.name}")
