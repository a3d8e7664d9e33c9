"""passt 2026-07's deprecated migration switches: a vhost-user daemon given them starts,
listens, and says they change nothing yet. Test-made namespaces only."""

from __future__ import annotations

from tests.netns.sandbox import Sandbox


def test_migrate_switches_start_and_are_said_to_have_no_effect(sandbox: Sandbox) -> None:
    sandbox.start_daemon("--vhost-user", "--migrate-exit", "--migrate-no-linger")
    log = sandbox.daemon_log()
    for flag in ("--migrate-exit", "--migrate-no-linger"):
        assert f"{flag} has no effect yet" in log, log
    assert sandbox.stop_daemon() == 0, sandbox.daemon_log()
