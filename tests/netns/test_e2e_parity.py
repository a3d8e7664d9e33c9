"""Behaviours of passt that a guest notices, end to end with the guest namespace's kernel.

Each test is one behaviour found different from passt 2026-07 (issue 22): a guest configured
only by our Router Advertisements (SLAAC) is reachable through `-t`; ...
"""

from __future__ import annotations

import ipaddress

from tests.netns.sandbox import Sandbox, wait_until
from tests.netns.tcp_guest import GW6, HOST6, MIB, client, log_lines, serve
from tests.netns.test_e2e_ipv6 import PREFIX, guest_addrs6, start


def _slaac_address(sandbox: Sandbox) -> str:
    def slaac() -> str | None:
        for a in guest_addrs6(sandbox, "global"):
            addr = ipaddress.IPv6Address(str(a["local"]))
            if addr in PREFIX and not a.get("tentative"):
                return str(addr)
        return None
    try:
        return str(wait_until(slaac, 15, "a SLAAC address in 2001:db8::/64"))
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{sandbox.daemon_log()}") from None


def test_inbound_ipv6_reaches_a_guest_configured_by_slaac_alone(sandbox: Sandbox) -> None:
    """No DHCPv6 client: the guest never has the host's address, only the one it made from
    our prefix, and has sent nothing from it yet (its duplicate address detection is all we
    saw). A `-t` connection must reach that address, not the host's."""
    start(sandbox, "-t", "10022:22")
    addr = _slaac_address(sandbox)
    assert addr != HOST6
    log = serve(sandbox, sandbox.guest_ns, "::", 22, "sink")
    r = client(sandbox, sandbox.world_ns, HOST6, 10022, "send", MIB, timeout=30)
    assert r["answer"] == [str(MIB), r["sha"]], r
    assert log_lines(log)[0].split()[0] == GW6  # the remote, unchanged
