"""pasta mode: give a network namespace the networking passt gives a VM, through a tap device.

This module wires the pieces; start-up, as pasta does it:
1. The namespace (namespace.py). Spawn mode (no PID, no --netns): a new user namespace for us
   (root inside mapped to our uid/gid), then a child in new network, mount, IPC, UTS and PID
   namespaces that runs the command (default: a login shell). Attach mode: the network
   namespace of a PID (and its user namespace unless --userns/--netns-only) or of --netns
   PATH|NAME.
2. Inside the namespace (a helper thread that setns()es, see netns.call_in_netns): open the
   tap, bring `lo` up, set or read the tap's MAC, and with --config-net give the tap the host's
   MTU, addresses and routes (config_net.py).
3. The same Dispatcher and Loop as passt mode, with a TapLink as the guest link; beside it the
   splice paths between the two loopbacks and the `auto` port scanner (forward.py).
4. Started as root, give that up once all of the above is done (isolation.py): nobody or
   --runas; the namespace helper thread (netns.NsThread) entered the namespace before, so
   namespace sockets can still be made. Spawn mode as root: the command's user namespace is
   created by the child as the target user, its root mapped to that user, as pasta's is.
5. Spawn mode stays in the foreground and exits with the command's status (128+signal if it was
   killed). Attach mode forks to the background (unless -f) and the parent exits 0 once the
   child is ready (core/process.py); the child exits when the namespace file goes away
   (watch.py; unless --no-netns-quit). --fd N: the caller's tap, already in the namespace,
   instead of opening one.
"""

from __future__ import annotations

import logging
import os
import signal
import socket

from vhostpasst.config.conf import Config, summary
from vhostpasst.core import flow, stats
from vhostpasst.core.log import setup_logging
from vhostpasst.core.loop import EPOLLIN
from vhostpasst.core.process import Process
from vhostpasst.ctl import wiring
from vhostpasst.ctl.server import ControlServer
from vhostpasst.pasta.config_net import (
    NsLink,
    host_snapshot,
    known_guest,
    setup_ns_link,
    setup_ns_loopback,
)
from vhostpasst.pasta.forward import attach_scans, auto_ports, control_sides, ns_target
from vhostpasst.pasta.namespace import PastaError, open_target
from vhostpasst.pasta.tcp_splice import TcpSplice
from vhostpasst.pasta.udp_splice import UdpSplice
from vhostpasst.pasta.watch import NetnsWatch
from vhostpasst.system import isolation, netns
from vhostpasst.system.sandbox import Sandbox, SandboxError

log = logging.getLogger("vhostpasst")


def run(config: Config) -> int:
    """Start-up order (each step needs what the one before made):
    logging, files, host listeners (-t/-u, while root may bind low ports); the namespace
    (spawn: as the target user already, see below); fork to the background; the namespace
    helper thread; the tap and its configuration; namespace listeners (-T/-U) and the splice
    path; giving up root and capabilities; then "ready": the parent exits 0 / the pid file is
    written / the spawned command starts. A client may connect once any of those happened."""
    from vhostpasst.core.loop import Loop
    from vhostpasst.core.pcap import PcapWriter
    from vhostpasst.dispatch import Dispatcher
    from vhostpasst.link.tuntap import TapLink

    process = Process()  # SIGTERM/SIGQUIT held back from here on
    spawn_mode = config.target_pid is None and config.netns is None
    foreground = config.foreground or spawn_mode
    # spawn mode shares the terminal with the command: quiet unless debugging
    quiet = config.quiet or (spawn_mode and not (config.debug or config.trace))
    setup_logging("pasta", foreground, config.debug, config.trace, quiet,
                  config.log_file, config.log_size)
    box = Sandbox("pasta", config.chroot_fallback)
    try:
        box.prepare()  # every import, while we may read every file
    except SandboxError as e:
        log.error("%s", e)
        return 1
    try:
        ids = isolation.target_ids(config.runas)
    except isolation.RunasError as e:
        log.error("--runas: %s", e)
        return 1
    switching = isolation.needs_switch(ids)
    # files are opened while we may still create them (pasta: before setuid)
    pcap: PcapWriter | None = None
    try:
        if config.pid_file:  # written at "ready", inside the sandbox or by the parent
            process.open_pid_file(config.pid_file)
        pcap = PcapWriter(config.pcap_file) if config.pcap_file else None
    except OSError as e:
        log.error("cannot open %s: %s", e.filename, e.strerror)
        return 1

    flow.raise_fd_limit()  # before the flow table sizes itself by it (the command gets it back)
    loop = Loop()
    dispatcher = Dispatcher(config, loop)
    try:
        host = host_snapshot(config) if config.config_net else {}
        dispatcher.listen()  # host side -t/-u: bound before anything can report ready
    except OSError as e:
        log.error("cannot forward ports: %s", e)
        dispatcher.close()
        return 1
    try:
        # spawn mode as root: the command's user namespace maps its root to the target user
        # before any thread: unshare/setns(USER) need that
        target = open_target(config, ids if switching else None)
    except (PastaError, OSError) as e:
        log.error("%s", e)
        dispatcher.close()
        return 1
    spawned = target.spawned
    if switching and not spawn_mode and not isolation.in_initial_userns():
        # we joined the target's user namespace (PID, --userns): switch to the same user
        # there if it is mapped; otherwise the setuid() is impossible and we stay the
        # namespace's root -- with the capabilities reduced below, like pasta in a userns
        assert ids is not None
        mapped = isolation.map_ids(ids)
        if mapped is None:
            log.warning("uid %d is not mapped in the joined user namespace: not switching",
                        ids.uid)
            switching = False
        ids = mapped
    if spawn_mode:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C is for the command
    if not foreground:
        process.to_background()

    def abandon() -> None:
        if spawned is not None:
            os.close(spawned.go_fd)  # the held command exits without running
            os.waitpid(spawned.pid, 0)
        dispatcher.close()
        os.close(target.netns_fd)

    try:
        helper = netns.NsThread(target.netns_fd)
    except OSError as e:
        log.error("cannot enter the namespace: %s", e.strerror)
        abandon()
        return 1
    nslink: NsLink | None = None
    try:
        if config.splice_only:  # no tap: the splice paths alone
            netns.call_in_netns(target.netns_fd, setup_ns_loopback)
            log.info("--splice-only: no tap, loopback traffic only")
        else:
            nslink = netns.call_in_netns(target.netns_fd, setup_ns_link, config, host)
    except Exception as e:  # PastaError, OSError (rtnl's NetlinkError)
        log.error("cannot set up the namespace interface: %s", e)
        helper.close()
        abandon()
        return 1
    if nslink is not None:
        log.debug("namespace interface %s (index %d), MAC %s", nslink.ifname, nslink.ifindex,
                  nslink.mac.hex(":"))

    status = [0]

    def stop(code: int = 0) -> None:
        status[0] = code
        loop.stop()

    watch: NetnsWatch | None = None
    control: ControlServer | None = None
    loopback_target = ns_target(config, dispatcher.guest)
    splice = TcpSplice(loop, target.netns_fd, loopback_target)
    usplice = UdpSplice(loop, target.netns_fd, loopback_target)
    fams = [f for f, c in ((socket.AF_INET, config.ip4), (socket.AF_INET6, config.ip6)) if c]
    try:
        # -T/-U: listeners on the namespace's loopback, spliced to the host's
        splice.listen_ns(target.netns_fd, config.tcp_out, fams)
        usplice.listen(config.udp_out, fams, to_ns=False)
        if not config.no_splice:  # -t/-u from the host's loopback: not through the tap
            if dispatcher.tcp is not None:
                dispatcher.tcp.claim = splice.claim
            usplice.listen(config.udp_in, fams, to_ns=True)
        if config.conf_path:  # before the scanner, whose listeners are not the tables'
            sides = control_sides(config, target.netns_fd, dispatcher, splice, usplice)
            control = wiring.start(config, loop, dispatcher, sides)
        auto = auto_ports(loop, config, target.netns_fd, dispatcher, splice, usplice, fams)
        if control is not None:
            attach_scans(sides, auto)
        # the watch is set up while its directory is still readable to us
        watch = NetnsWatch(loop, target.watch_path, stop) if target.watch_path else None
    except OSError as e:
        log.error("cannot forward ports from the namespace: %s", e)
        ok = False
    else:
        try:
            # mount, IPC and UTS namespaces and the empty root while we may still mount; then
            # the last thing that needs privileges; the helper thread stays in the namespace
            # and keeps CAP_NET_BIND_SERVICE there (reference 7: pasta keeps it for low ports)
            box.prefork(own_userns=False, threads=(helper.run,))
            isolation.drop(ids if switching else None, (isolation.CAP_NET_BIND_SERVICE,),
                           (helper.run,))
            ok = True
        except SandboxError as e:
            log.error("%s", e)
            ok = False
        except OSError as e:
            log.error("cannot drop privileges: %s", e)
            ok = False
    if not ok:
        if control is not None:
            control.close()
        if watch is not None:
            watch.close()
        usplice.close()
        splice.close()
        if nslink is not None:
            os.close(nslink.fd)
        helper.close()
        abandon()
        return 1
    if switching:
        assert ids is not None
        log.debug("now running as uid %d, gid %d", ids.uid, ids.gid)
    link: TapLink | None = None
    if nslink is not None:
        link = TapLink(loop, nslink.fd, dispatcher.on_frames, pcap=pcap,
                       on_exit=lambda: stop(1))
        dispatcher.link = link
        known_guest(dispatcher.guest, nslink)

    pidfd: int | None = None
    if spawned is not None:
        pidfd = os.pidfd_open(spawned.pid)

        def on_child(_mask: int) -> None:
            pid, wstatus = os.waitpid(spawned.pid, os.WNOHANG)
            if pid:
                code = os.waitstatus_to_exitcode(wstatus)
                spawned.pid = 0
                stop(128 - code if code < 0 else code)

        loop.add_fd(pidfd, EPOLLIN, on_child)

    if auto is not None:
        auto.start()
    if not quiet:
        for line in summary(config):
            log.info("%s", line)
    # ready: every listener is bound, so whoever waits on one of these may connect at once
    try:  # every thread in the empty root, then the filter (reference 7: isolate_postfork)
        box.postfork((helper.run,))
    except SandboxError as e:
        log.error("%s", e)
        os._exit(1)  # nothing of the host is reachable any more to clean up with
    process.ready(box.devnull)
    if spawned is not None:
        os.write(spawned.go_fd, b"g")  # the namespace is ready: run the command
        os.close(spawned.go_fd)

    stats.watch(loop, config.stats, [*dispatcher.stat_counters(),
                                     ("splice", lambda: len(splice.conns))])
    try:
        process.run(loop)
    finally:
        if spawned is not None and spawned.pid:
            # we are going: take the command's PID namespace down with us
            try:
                os.kill(spawned.init_pid, signal.SIGKILL)
                os.waitpid(spawned.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        if watch is not None:
            watch.close()
        if pidfd is not None:
            loop.remove_fd(pidfd)
            os.close(pidfd)
        if auto is not None:
            auto.close()
        if control is not None:
            control.close()
        usplice.close()
        splice.close()
        dispatcher.close()
        if link is not None:
            link.close()
        if pcap is not None:
            pcap.close()
        helper.close()
        loop.close()
        os.close(target.netns_fd)
    return status[0]
