"""passt mode: wire the configuration, the loop, the guest link and the dispatcher, then run.

Start-up order follows passt: logging, capture file, listening socket, the start-up summary,
then (unless --foreground) fork so that the parent exits 0 only once the socket is listening
and the pid file holds the child's pid. SIGTERM and SIGQUIT end the loop and exit with 0
(signals, pid file, fork and readiness: core/process.py, the skeleton pasta mode shares).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from vhostpasst import __version__
from vhostpasst.config.conf import DEFAULT_MTU, Config, summary
from vhostpasst.core import flow, stats
from vhostpasst.core.log import setup_logging
from vhostpasst.core.loop import Loop
from vhostpasst.core.looptrace import ENV_LOOP_TRACE
from vhostpasst.core.pcap import PcapWriter
from vhostpasst.core.process import Process
from vhostpasst.ctl import wiring
from vhostpasst.ctl.server import ControlServer
from vhostpasst.dispatch import Dispatcher
from vhostpasst.link.base import Link
from vhostpasst.link.stream import StreamListener
from vhostpasst.system.sandbox import Sandbox, SandboxError
from vhostpasst.wire.eth import ETH_HLEN

log = logging.getLogger("vhostpasst")


def qemu_hint(path: str, vhost_user: bool = False) -> str:
    if vhost_user:  # passt's wording (vhost_user.c)
        return (
            "You can start qemu with:\n"
            f"    kvm ... -chardev socket,id=chr0,path={path} "
            "-netdev vhost-user,id=netdev0,chardev=chr0 -device virtio-net,netdev=netdev0 "
            "-object memory-backend-memfd,id=memfd0,share=on,size=$RAMSIZE "
            "-numa node,memdev=memfd0"
        )
    return (
        "You can now start qemu (>= 7.2, with commit 13c6be96618c):\n"
        "    kvm ... -device virtio-net-pci,netdev=s "
        f"-netdev stream,id=s,server=off,addr.type=unix,addr.path={path}"
    )


def _vhost_link(config: Config, loop: Loop, dispatcher: Dispatcher, pcap: PcapWriter | None,
                on_exit: Callable[[], None]) -> Link:
    """--vhost-user: with --fd (qemu's -netdev passt,vhost-user=on) or a listening socket."""
    from vhostpasst.link import vhost  # the virtio library only when asked for

    frame_max = ETH_HLEN + (config.mtu or DEFAULT_MTU)  # what an in-place guest RX buffer must hold
    # a live migration moves the guest's addresses and, through the TCP_REPAIR helper, its
    # established TCP connections (DEVICE_STATE)
    link: vhost.VhostUserLink
    listener: Link
    if config.fd is not None:
        listener = link = vhost.vhost_link_from_fd(
            loop, config.fd, dispatcher.on_frames, pcap=pcap, on_exit=on_exit,
            frame_max=frame_max, guest=dispatcher.guest, repair_path=config.repair_path)
    else:
        listener = vhost.VhostUserListener(
            loop, config.socket_path, dispatcher.on_frames, pcap=pcap, one_off=config.one_off,
            on_exit=on_exit, frame_max=frame_max, guest=dispatcher.guest,
            repair_path=config.repair_path)
        link = listener.link
    if dispatcher.tcp is not None:
        from vhostpasst.proto.tcp.migrate import TcpMover

        link.conns = TcpMover(dispatcher.tcp, lambda: link.repair, config.migrate_no_linger)
    if config.migrate_no_linger:
        log.info("--migrate-no-linger: TCP sockets moved in a migration close at once here")
    if config.migrate_exit:
        log.info("--migrate-exit: exiting once a migration from here completes")

        def migrated() -> None:
            log.info("migration complete, exiting (--migrate-exit)")
            on_exit()

        link.on_migrated = migrated
    return listener


def run(config: Config) -> int:
    """passt mode (main.py runs pasta mode's pasta/session.py instead)."""
    process = Process()  # SIGTERM/SIGQUIT held back from here on
    setup_logging("passt", config.foreground, config.debug, config.trace, config.quiet,
                  config.log_file, config.log_size)
    log.debug("vhostpasst %s starting", __version__)
    if config.repair_path and not config.vhost_user:
        log.warning("--repair-path %s ignored: it is for --vhost-user mode (live migration)",
                    config.repair_path)
    flow.raise_fd_limit()  # before the flow table sizes itself by it
    from vhostpasst.system import isolation

    try:  # root in the initial user namespace becomes nobody (or --runas) once set up
        ids = isolation.target_ids(config.runas)
    except isolation.RunasError as e:
        log.error("--runas: %s", e)
        return 1
    if config.pid_file:  # passt opens it before setuid (and the sandbox empties the root)
        try:
            process.open_pid_file(config.pid_file)
        except OSError as e:
            log.error("cannot open %s: %s", config.pid_file, e.strerror)
            return 1
    pcap = PcapWriter(config.pcap_file) if config.pcap_file else None
    loop = Loop()
    trace_path = os.environ.get(ENV_LOOP_TRACE)
    if trace_path:
        try:  # opened now: privileges go before the loop runs
            loop.trace_to(open(trace_path, "w"))
        except OSError as e:
            log.error("%s: cannot open %s: %s", ENV_LOOP_TRACE, trace_path, e.strerror)
            return 1
    dispatcher = Dispatcher(config, loop)

    def on_exit() -> None:
        loop.stop()

    try:
        dispatcher.listen()
    except OSError as e:
        log.error("cannot forward ports: %s", e)
        dispatcher.close()
        return 1
    listener: Link
    try:
        if config.vhost_user:
            listener = _vhost_link(config, loop, dispatcher, pcap, on_exit)
        elif config.fd is not None:
            listener = StreamListener.from_fd(loop, config.fd, dispatcher.on_frames, pcap=pcap,
                                              on_exit=on_exit)
        else:
            listener = StreamListener(loop, config.socket_path, dispatcher.on_frames, pcap=pcap,
                                      one_off=config.one_off, on_exit=on_exit)
    except OSError as e:
        log.error("cannot set up the guest link: %s", e)
        dispatcher.close()
        return 1
    dispatcher.link = listener
    control: ControlServer | None = None
    if config.conf_path:
        try:
            control = wiring.start(config, loop, dispatcher,
                                   [wiring.host_side(config, dispatcher)])
        except OSError as e:
            log.error("cannot open the control socket %s: %s", config.conf_path, e.strerror or e)
            dispatcher.close()
            listener.close()
            return 1
    box = Sandbox("vhost-user" if config.vhost_user else "stream", config.chroot_fallback)
    try:
        box.prepare()  # every import, while still root
    except SandboxError as e:
        log.error("%s", e)
        dispatcher.close()
        listener.close()
        return 1
    try:  # the socket exists and listeners are bound: nothing below needs root
        # CAP_SYS_CHROOT until the sandbox is made (--chroot-fallback), then nothing
        isolation.drop(ids, box.keep_until_sandboxed)
    except OSError as e:
        log.error("cannot drop privileges: %s", e)
        dispatcher.close()
        listener.close()
        return 1

    if not config.quiet:
        for line in summary(config):
            log.info("%s", line)
        path = getattr(listener, "path", None)
        if config.fd is None and path is not None:
            log.info("%s", qemu_hint(path, config.vhost_user))
    try:  # as passt: namespaces and the empty root before the fork, the filter after it
        box.prefork(own_userns=True, pid_ns=not config.foreground)
        if not config.foreground:
            process.to_background()
        process.ready(box.devnull)  # the socket listens: the parent may exit 0
        box.postfork()
    except SandboxError as e:
        log.error("%s", e)
        dispatcher.close()
        listener.close()
        return 1

    stats.watch(loop, config.stats, dispatcher.stat_counters())
    try:
        process.run(loop)
    except KeyboardInterrupt:
        log.info("interrupted")
    finally:
        if control is not None:
            control.close()
        dispatcher.close()
        listener.close()
        if pcap is not None:
            pcap.close()
        loop.close()
    return 0
