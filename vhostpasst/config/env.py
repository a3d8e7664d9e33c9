"""Numbers read from the environment: the VHOSTPASST_* hooks tests and debugging set (TCP's
retransmission limits and idle timeout, UDP's flow timeout). Never set in production; a value
that is not a positive number is ignored."""

from __future__ import annotations

import os


def env_number(name: str, default: float) -> float:
    """`$name` as a positive number, else `default`."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default
