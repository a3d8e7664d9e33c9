"""passt 2026-07's deprecated migration switches: a vhost-user daemon given them starts,
listens, and says what they do. Test-made namespaces only. (What they do in a migration:
test_migrate_tcp.py.)"""

from __future__ import annotations

from tests.netns.sandbox import Sandbox, wait_until

LINES = ("--migrate-no-linger: TCP sockets moved in a migration close at once",
         "--migrate-exit: exiting once a migration from here completes")


def test_migrate_switches_start_and_are_logged(sandbox: Sandbox) -> None:
    sandbox.start_daemon("--vhost-user", "--migrate-exit", "--migrate-no-linger")
    # logged as the link is made, just after the socket listens
    wait_until(lambda: all(line in sandbox.daemon_log() for line in LINES), 10,
               "the switches logged")
    assert sandbox.stop_daemon() == 0, sandbox.daemon_log()
