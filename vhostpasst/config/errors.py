"""The errors configuration raises: what the user typed is wrong, or not supported yet."""

from __future__ import annotations


class ConfigError(Exception):
    """A bad option value or a configuration the host cannot satisfy.

    `option` names what the user typed (e.g. "--mtu"), so the message can point at it.
    """

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option = option
        self.reason = reason


class NotSupported(ConfigError):
    """A valid option this version cannot honour yet: refuse rather than ignore it."""

    def __init__(self, option: str, what: str | None = None) -> None:
        super().__init__(option, "not supported yet")
        self.args = (f"{what or option} is not supported yet",)
