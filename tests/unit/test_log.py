"""Logging setup: destinations and levels, the size-capped log file, rate limiting."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostpasst import __version__
from vhostpasst.core.log import (
    TRACE,
    RateLimitedLog,
    SizeCappedFileHandler,
    detached,
    setup_logging,
    trace,
)


@pytest.fixture
def restore_root() -> Iterator[None]:
    """setup_logging() changes the root logger: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


def test_levels(restore_root: None, tmp_path: Path) -> None:
    cases = [
        (dict(debug=False, trace=False, quiet=False), logging.INFO),
        (dict(debug=False, trace=False, quiet=True), logging.WARNING),
        (dict(debug=True, trace=False, quiet=False), logging.DEBUG),
        (dict(debug=True, trace=True, quiet=False), TRACE),
    ]
    for flags, level in cases:
        setup_logging("vhostpasst", True, log_file=str(tmp_path / "l.log"), log_size=65536, **flags)
        assert logging.getLogger().level == level
    assert logging.getLevelName(TRACE) == "TRACE"


def test_log_file_header_and_lines(restore_root: None, tmp_path: Path) -> None:
    path = tmp_path / "vp.log"
    path.write_text("old content that must go\n" * 10)
    handlers = setup_logging("vhostpasst", False, False, False, False, str(path), 65536)
    # background with a log file: the file, and stderr until the daemon is detached
    assert [type(h) for h in handlers] == [SizeCappedFileHandler, logging.StreamHandler]
    detached()
    assert handlers[1] not in logging.getLogger().handlers
    logger = logging.getLogger("vhostpasst.test")
    logger.info("hello %s", "world")
    logger.debug("not at info level")
    trace(logger, "nor this")
    lines = path.read_text().splitlines()
    assert lines[0].startswith(f"vhostpasst {__version__}: ")
    assert lines[0].endswith(f"({os.getpid()})")
    assert len(lines) == 2
    assert lines[1].endswith(": hello world")
    assert "old content" not in path.read_text()


def test_second_setup_replaces_handlers(restore_root: None, tmp_path: Path) -> None:
    root = logging.getLogger()
    n = len(root.handlers)
    setup_logging("p", False, False, False, False, str(tmp_path / "a.log"), 65536)
    setup_logging("p", False, False, False, False, str(tmp_path / "b.log"), 65536)
    assert len(root.handlers) == n + 2  # the file, and stderr until detached


def test_foreground_logs_to_stderr(restore_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    handlers = setup_logging("p", True, False, False, False, None, 0)
    assert [type(h) for h in handlers] == [logging.StreamHandler]
    logging.getLogger("vhostpasst.x").warning("to stderr")
    assert "to stderr" in capsys.readouterr().err


def test_foreground_with_log_file_writes_both(restore_root: None, tmp_path: Path) -> None:
    handlers = setup_logging("p", True, True, False, False, str(tmp_path / "f.log"), 65536)
    assert {type(h) for h in handlers} == {SizeCappedFileHandler, logging.StreamHandler}


def test_background_without_file_uses_syslog_or_stderr(restore_root: None) -> None:
    handlers = setup_logging("p", False, False, False, False, None, 0)
    h = handlers[0]
    if os.path.exists("/dev/log") and isinstance(h, logging.handlers.SysLogHandler):
        assert h.facility == logging.handlers.SysLogHandler.LOG_DAEMON
        assert [type(x) for x in handlers[1:]] == [logging.StreamHandler]  # until detached
    else:
        assert len(handlers) == 1 and isinstance(h, logging.StreamHandler)


def test_background_writes_stderr_until_detached(restore_root: None, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """As passt: before it goes to the background its caller (podman, libvirt, a terminal)
    reads its stderr, so a start-up error reaches it; after, only the log file does."""
    path = tmp_path / "bg.log"
    setup_logging("p", False, False, False, True, str(path), 65536)  # --quiet too
    log = logging.getLogger("vhostpasst.x")
    log.error("cannot forward ports: address in use")
    log.info("not with --quiet")
    assert capsys.readouterr().err == "cannot forward ports: address in use\n"
    detached()
    log.error("after detaching")
    assert capsys.readouterr().err == ""
    assert "after detaching" in path.read_text()


def test_rotation_stays_under_cap_and_keeps_newest(tmp_path: Path) -> None:
    path = tmp_path / "rot.log"
    cap = 40960
    handler = SizeCappedFileHandler(str(path), cap, "prog 1.0: /bin/prog (1)")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger("rot")
    logger.addHandler(handler)
    sizes = []
    for i in range(5000):
        logger.info("line %06d %s", i, "x" * (i % 50))
        size = path.stat().st_size
        assert size <= cap
        sizes.append(size)
    handler.close()
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == "prog 1.0: /bin/prog (1)"  # the header survives rotation
    numbers = [int(line.split()[1]) for line in lines[1:]]
    assert numbers == list(range(numbers[0], 5000))  # contiguous, newest kept, cut at lines
    assert all(line.startswith("line ") for line in lines[1:])
    # after the first rotation the file stays between ~60% and 100% of the cap
    first_rot = next(i for i in range(1, len(sizes)) if sizes[i] < sizes[i - 1])
    assert min(sizes[first_rot:]) >= 0.6 * cap


def test_huge_line_does_not_wipe_history(tmp_path: Path) -> None:
    path = tmp_path / "huge.log"
    handler = SizeCappedFileHandler(str(path), 4096, "hdr")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger("huge")
    logger.addHandler(handler)
    logger.info("before")
    logger.info("y" * 100000)
    logger.info("after")
    handler.close()
    text = path.read_text()
    assert path.stat().st_size <= 4096
    assert text.startswith("hdr\n")
    assert text.endswith("after\n")


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rate_limited_log(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    logger = logging.getLogger("vhostpasst.ratetest")
    rl = RateLimitedLog(logger, interval=10.0, clock=clock)
    with caplog.at_level(logging.DEBUG, logger="vhostpasst.ratetest"):
        assert rl.warning("bad", "bad frame from %s", "guest")
        for _ in range(99):
            clock.t += 0.05
            assert not rl.warning("bad", "bad frame from %s", "guest")
        assert rl.warning("other", "another kind")  # keys are independent
        clock.t += 10.0
        assert rl.warning("bad", "bad frame from %s", "guest")
        clock.t += 10.0
        assert rl.warning("bad", "bad frame from %s", "guest")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [
        "bad frame from guest",
        "another kind",
        "bad frame from guest (99 similar messages suppressed)",
        "bad frame from guest",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_rate_limited_below_level_is_not_counted(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("vhostpasst.ratetest2")
    rl = RateLimitedLog(logger, clock=FakeClock())
    with caplog.at_level(logging.INFO, logger="vhostpasst.ratetest2"):
        assert not rl.debug("k", "debug message")
        assert rl.log(logging.INFO, "k", "info message")
    assert [r.getMessage() for r in caplog.records] == ["info message"]


def test_rate_limited_key_table_is_bounded() -> None:
    rl = RateLimitedLog(logging.getLogger("vhostpasst.ratetest3"), max_keys=10)
    for i in range(1000):
        rl.warning(i, "m")
    assert len(rl._slots) <= 10
