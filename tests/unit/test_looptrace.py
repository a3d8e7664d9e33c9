"""The loop's wake-up trace (VHOSTPASST_LOOP_TRACE): what each row says, the limit, the labels."""

from __future__ import annotations

import functools
import socket
from pathlib import Path

from vhostpasst.core.loop import Loop
from vhostpasst.core.looptrace import HEADER, WakeupTrace, label


class _Queue:
    index = 1


def _on_data(sock: socket.socket, _queue: _Queue, _mask: int) -> None:
    sock.recv(100)


def _rows(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    assert lines[0] + "\n" == HEADER
    return [line.split("\t") for line in lines[1:]]


def test_each_wake_up_is_a_row_with_its_callbacks_and_timers(tmp_path: Path) -> None:
    loop = Loop()
    trace = tmp_path / "loop.tsv"
    loop.trace_to(open(trace, "w"))
    a, b = socket.socketpair()
    try:
        loop.add_fd(a.fileno(), 1, functools.partial(_on_data, a, _Queue()))  # EPOLLIN
        b.send(b"x")
        loop.run_once(1.0)  # the fd
        fired: list[int] = []
        loop.call_later(0, lambda: fired.append(1))
        loop.run_once(1.0)  # the timer alone
        loop.run_once(0)  # nothing: the timeout
        assert fired == [1]
    finally:
        loop.remove_fd(a.fileno())
        a.close()
        b.close()
        loop.close()
    rows = _rows(trace)
    assert [r[2:] for r in rows] == [["0", "_on_data[1]"], ["1", "-"], ["0", "-"]]
    starts = [float(r[0]) for r in rows]
    assert starts == sorted(starts)
    assert all(float(r[1]) >= 0 for r in rows)


def test_rows_past_the_limit_are_counted_not_kept(tmp_path: Path) -> None:
    trace = tmp_path / "loop.tsv"
    loop = Loop()
    loop.trace_to(open(trace, "w"), limit=2)
    for _ in range(5):
        loop.run_once(0)
    loop.close()
    text = trace.read_text()
    assert len(_rows_only(text)) == 2
    assert text.endswith("# 3 more wake-ups not recorded (limit 2)\n")


def _rows_only(text: str) -> list[str]:
    return [line for line in text.splitlines()[1:] if not line.startswith("#")]


def test_labels() -> None:
    class Backend:
        def on_kick(self, queue: object, mask: int) -> None: ...

    assert label(None) == "?"
    assert label(_on_data) == "_on_data"
    assert label(functools.partial(Backend().on_kick, _Queue())) == \
        "test_labels.<locals>.Backend.on_kick[1]"
    assert label(functools.partial(_on_data, "no index")) == "_on_data"
    assert label(lambda mask: None) == "test_labels.<locals>.<lambda>"


def test_write_closes_the_file_and_empties_the_rows(tmp_path: Path) -> None:
    f = open(tmp_path / "t.tsv", "w")
    trace = WakeupTrace(f)
    trace.add(1.0, 1.0005, 0, ["a", "b"])
    trace.write()
    assert f.closed and trace.rows == []
    assert (tmp_path / "t.tsv").read_text() == HEADER + "1.000000\t500.0\t0\ta,b\n"
