"""The flow table: keys, capacity, lazy timer-driven expiry (with a fake loop and clock)."""

from __future__ import annotations

from tests.fakes import FakeLoop
from vhostpasst.core.flow import Flow, FlowTable


class F(Flow):
    timeout: float | None = 10.0

    def __init__(self) -> None:
        super().__init__()
        self.close_calls = 0

    def close(self) -> None:
        self.close_calls += 1


def table(max_flows: int = 100) -> tuple[FakeLoop, FlowTable]:
    loop = FakeLoop()
    return loop, FlowTable(loop, clock=lambda: loop.now, max_flows=max_flows)


def test_lookup_by_every_key_and_removal_closes_once() -> None:
    _, ft = table()
    f = F()
    assert ft.add(f, ("a", 1), ("b", 2))
    assert ft.lookup(("a", 1)) is f and ft.lookup(("b", 2)) is f
    assert ft.add_key(f, ("c", 3)) and ft.lookup(("c", 3)) is f
    f.remove()
    f.remove()
    ft.remove(f)
    assert f.close_calls == 1 and f.closed
    assert ft.lookup(("a", 1)) is None and ft.lookup(("c", 3)) is None and len(ft) == 0


def test_duplicate_key_is_refused_and_nothing_inserted() -> None:
    _, ft = table()
    a, b = F(), F()
    assert ft.add(a, "k")
    assert not ft.add(b, "x", "k")
    assert ft.lookup("x") is None and len(ft) == 1
    assert not ft.add_key(b, "y")  # b is not in the table


def test_capacity_is_bounded() -> None:
    _, ft = table(max_flows=2)
    assert ft.add(F(), 1) and ft.add(F(), 2)
    assert ft.full() and not ft.add(F(), 3)


def test_expiry_after_timeout_without_activity() -> None:
    loop, ft = table()
    f = F()
    ft.add(f, "k")
    loop.advance(9.9)
    assert ft.lookup("k") is f
    loop.advance(0.2)
    assert ft.lookup("k") is None and f.close_calls == 1


def test_activity_pushes_expiry_back_with_one_timer() -> None:
    loop, ft = table()
    f = F()
    ft.add(f, "k")
    for _ in range(5):
        loop.advance(6)
        f.touch()
    assert ft.lookup("k") is f
    assert len([t for t in loop.timers if not t.cancelled]) == 1  # re-armed lazily, not per touch
    loop.advance(10.5)
    assert ft.lookup("k") is None


def test_default_capacity_stays_below_the_descriptor_limit() -> None:
    import resource

    from vhostpasst.core.flow import default_max_flows

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = default_max_flows()
    assert 16 <= n and (soft == resource.RLIM_INFINITY or n < soft)


_LIMITS = """
import resource, sys
from vhostpasst.core import flow
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
print(flow.raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE), flow.default_max_flows())
print(flow.raise_fd_limit())  # already raised
flow.restore_fd_limit()
print(resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def _limits(soft: int, hard: int) -> list[str]:
    """raise_fd_limit() and restore_fd_limit() in a child (limits are per process)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _LIMITS, str(soft), str(hard)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_open_files_limit_raised_to_the_hard_limit_and_flows_sized_by_it() -> None:
    """As passt at start: a soft limit of 300 would cap us at 236 flows."""
    raised, again, restored = _limits(300, 4096)
    assert raised == "(300, 4096) (4096, 4096) 4032"
    assert again == "None"
    assert restored == "(300, 4096)"  # what pasta's command gets back


def test_open_files_limit_already_at_the_hard_limit_left_alone() -> None:
    raised, again, restored = _limits(2048, 2048)
    assert raised == "None (2048, 2048) 1984"
    assert again == "None" and restored == "(2048, 2048)"


def test_flows_without_timeout_never_expire_and_close_all() -> None:
    loop, ft = table()

    class Forever(F):
        timeout = None

    f, g = Forever(), F()
    ft.add(f, 1)
    ft.add(g, 2)
    loop.advance(1e6)
    assert ft.lookup(1) is f and ft.lookup(2) is None
    ft.close_all()
    assert len(ft) == 0 and f.close_calls == 1


def test_a_failing_close_does_not_escape() -> None:
    _, ft = table()

    class Bad(F):
        def close(self) -> None:
            raise RuntimeError("boom")

    b = Bad()
    ft.add(b, 1)
    ft.remove(b)
    assert len(ft) == 0
