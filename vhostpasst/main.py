"""The entry points: `vhostpasst` / `passt` and `vhostpasta` / `pasta` (pyproject's scripts,
`python -m vhostpasst`). Parse the command line (config.cli), build the configuration
(config.conf), and run passt mode (daemon.py) or pasta mode (pasta/session.py); the heavy
imports happen only when we really run."""

from __future__ import annotations

import sys

from vhostpasst.config.cli import (
    PASST,
    PASTA,
    check_supported,
    display_name,
    mode_from_name,
    parse_args,
    usage,
)
from vhostpasst.config.errors import ConfigError
from vhostpasst.system.procname import set_process_name
from vhostpasst.version import version_line


def main(argv: list[str] | None = None, prog: str | None = None, default: str = PASST,
         close_inherited: bool = False) -> int:
    """Parse, check, build the configuration, run the daemon; return the exit status.
    `close_inherited` (the installed commands, not in-process callers such as tests): close
    what the caller left open, but --fd, before anything else is opened."""
    if argv is None:
        argv = sys.argv[1:]
    if prog is None:
        prog = sys.argv[0] if sys.argv and sys.argv[0] else "vhostpasst"
    mode = mode_from_name(prog, default)
    name = display_name(prog, mode)
    try:
        options = parse_args(argv, mode)
        if options.action == "help":
            sys.stdout.write(usage(name, mode))
            return 0
        if options.action == "version":
            print(version_line(name))
            return 0
        if options.action == "capabilities":
            print('{"type": "net"}')
            return 0
        check_supported(options)
        set_process_name(name)  # `pgrep passt` finds us (procname.py)
        if close_inherited:
            from vhostpasst.system import isolation

            isolation.close_inherited_fds(() if options.fd is None else (options.fd,))
        from vhostpasst.config.conf import build_config  # host look-ups only once parsing is done

        config = build_config(options)
    except ConfigError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    # heavy imports only when we really run
    if config.mode == PASTA:
        from vhostpasst.pasta import session

        return session.run(config)
    from vhostpasst import daemon

    return daemon.run(config)


def main_passt() -> int:
    return main(default=PASST, close_inherited=True)


def main_pasta() -> int:
    return main(default=PASTA, close_inherited=True)

