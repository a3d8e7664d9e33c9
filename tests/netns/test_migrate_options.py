"""passt 2026-07's deprecated migration switches: a vhost-user daemon given them starts,
listens, and says what they do. Test-made namespaces only. (What they do in a migration:
test_migrate_tcp.py.)"""

from __future__ import annotations

from tests.netns.sandbox import Sandbox


def test_migrate_switches_start_and_are_logged(sandbox: Sandbox) -> None:
    sandbox.start_daemon("--vhost-user", "--migrate-exit", "--migrate-no-linger")
    log = sandbox.daemon_log()
    assert "--migrate-no-linger: TCP sockets moved in a migration close at once" in log, log
    assert "--migrate-exit: exiting once a migration from here completes" in log, log
    assert sandbox.stop_daemon() == 0, sandbox.daemon_log()
