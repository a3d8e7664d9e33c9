"""The flow table: keys, capacity, lazy timer-driven expiry (with a fake loop and clock)."""

from __future__ import annotations

from collections.abc import Callable

from vhostpasst.flow import Flow, FlowTable


class FakeTimer:
    def __init__(self, when: float, cb: Callable[[], None]) -> None:
        self.when, self.cb, self.cancelled = when, cb, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """call_at only; `advance(t)` runs due timers in order, like Loop.run_once."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[FakeTimer] = []

    def call_at(self, when: float, cb: Callable[[], None]) -> FakeTimer:
        t = FakeTimer(when, cb)
        self.timers.append(t)
        return t

    def advance(self, dt: float) -> None:
        self.now += dt
        while True:
            due = sorted((t for t in self.timers if t.when <= self.now and not t.cancelled),
                         key=lambda t: t.when)
            if not due:
                return
            for t in due:
                self.timers.remove(t)
                t.cb()


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

    from vhostpasst.flow import default_max_flows

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = default_max_flows()
    assert 16 <= n and (soft == resource.RLIM_INFINITY or n < soft)


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
