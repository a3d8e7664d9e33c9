"""The vhost-user link: the guest's virtqueues, through virtio.VhostUserBackend + NetDevice.

qemu (`-chardev socket` + `-netdev vhost-user`, or `-netdev passt,vhost-user=on` handing us a
connected socketpair with `--fd`) speaks vhost-user on a UNIX socket; the guest's RAM is mapped
from the memfds it passes. One front end is served at a time; when it goes away the device is
reset (rings, memory, features) and the next connection starts clean, or with one-off / --fd the
daemon exits.

TX (guest -> us): on a TX kick, up to TX_BATCH chains are popped, the 12-byte virtio-net
header is skipped and the frames are handed to the dispatcher as memoryviews *into guest
memory* (no copy). A frame split across several readable buffers (header and data apart are
not "split"; data in several pieces is, e.g. a Linux skb with page fragments) is joined by one
copy. Then every chain goes back used (len 0), with one used-index store and at most one call.
If the batch limit was hit, the rest is processed on the next loop iteration.

RX (us -> guest): the link's RX half, vhost_rx.py.

Live migration: the dirty log is the back end's (virtio/backend.py); given the guest's
addresses (`guest`: the dispatcher's GuestAddrs), the device also offers DEVICE_STATE and
moves them to the destination in vhostpasst's state stream (link/migrate.py), with the
established TCP connections when the daemon gave the link a mover (`conns`:
proto/tcp/migrate.py). The TCP_REPAIR helper's socket (`--repair-path`, by default the
vhost-user socket's path + ".repair") is made here too (system/repair.py); the mover has the
helper put the connections' sockets in repair mode.

A front end that breaks the ring rules (descriptors outside its memory, loops...) is
disconnected: the listener then serves the next one.
"""

from __future__ import annotations

import functools
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

from vhostpasst.core.log import RateLimitedLog
from vhostpasst.core.loop import Loop
from vhostpasst.core.nat import GuestAddrs
from vhostpasst.core.pcap import PcapWriter
from vhostpasst.link import migrate
from vhostpasst.link.base import (
    ETH_MAX_FRAME,
    NO_CAPS,
    ForwardingLink,
    FrameHandler,
    LinkCaps,
    TxConsumer,
)
from vhostpasst.link.stream import (
    DEFAULT_PROBE_COUNT,
    DEFAULT_PROBE_PATTERN,
    ETH_HLEN,
    ExitCallback,
    connected_socket,
    listen_for,
)
from vhostpasst.link.vhost_rx import BOUNCE_SLOTS, VhostRx
from vhostpasst.system.repair import RepairServer, default_path
from vhostpasst.wire import eth, ip
from vhostpasst.wire.tcp import TCP_HLEN
from virtio import net
from virtio.backend import VhostUserBackend
from virtio.devstate import Direction
from virtio.virtqueue import VirtQueue, VirtQueueError

log = logging.getLogger(__name__)
_ratelimited = RateLimitedLog(log)

TX_BATCH = 256  # guest frames handled per wake-up; more wait for the next loop iteration
HDR = net.HEADER
# A guest sending in bulk kicks for nearly every frame, and a wake-up costs more than the
# frame it brings: after a TX batch of TX_BULK_BYTES or more, a kick is served TX_COALESCE
# later (the loop's epoll wait rounds it up to 1 ms at most, unless another event comes
# first), so the frames the guest writes meanwhile come in the same pass (like a NIC's
# interrupt coalescing). Small frames (requests, answers, ACKs) are never held.
TX_COALESCE = 0.0002  # seconds
TX_BULK_BYTES = 64 * 1024

# What we offer on top of the ring features (VERSION_1, EVENT_IDX, INDIRECT_DESC) the back end
# adds. CSUM: guest frames may carry a partial L4 checksum (NEEDS_CSUM); nothing here checks
# L4 checksums (payloads go to host sockets), so they are accepted as they are. GUEST_CSUM: we
# mark frames DATA_VALID and the guest skips verifying them. No MTU/STATUS: qemu emulates the
# link status itself and takes the MTU from its own host_mtu= property.
# HOST_TSO4/6 (+ECN): guest TCP frames of up to 64 KiB whatever the MTU; TCP writes payloads
# to host sockets, so a frame's size costs nothing and the guest's ECN bit means nothing here.
# GUEST_TSO4/6: TCP data to the guest in frames of up to 64 KiB (the guest needs GUEST_CSUM
# for them), segmented by the guest's GRO-aware stack or not at all on local delivery.
# MQ: a guest given several queue pairs (qemu's queues=N, libvirt's <driver queues='N'/>)
# transmits on any of them; everything for it goes out on the first RX queue (one loop serves
# them all, and the spec's receive steering by flow is only a SHOULD). Without MQ qemu refuses
# to start such a guest at all ("asking more queues than supported").
NET_FEATURES = (net.F_MRG_RXBUF | net.F_CSUM | net.F_GUEST_CSUM | net.F_HOST_TSO4
                | net.F_HOST_TSO6 | net.F_HOST_ECN | net.F_GUEST_TSO4 | net.F_GUEST_TSO6
                | net.F_MQ)
QUEUE_PAIRS_MAX = 128  # GET_QUEUE_NUM's answer; a VirtQueue per queue costs ~1 µs and 256 bytes
_OFFLOADS = (("from the guest", ((net.F_CSUM, "csum"), (net.F_HOST_TSO4, "tso4"),
                                 (net.F_HOST_TSO6, "tso6"), (net.F_HOST_ECN, "ecn"))),
             ("to the guest", ((net.F_GUEST_CSUM, "csum"), (net.F_GUEST_TSO4, "tso4"),
                               (net.F_GUEST_TSO6, "tso6"))))
_ETH_IP = struct.Struct("!12xHBxH5xB")  # ethertype, IPv4 version/IHL and total length, proto
_ETH_IP6 = struct.Struct("!12xH4xHB")  # ethertype, IPv6 payload length, next header


def offloads(features: int) -> str:
    """The offloads a front end took, for the log: "from the guest: csum tso4; to the
    guest: none"."""
    return "; ".join(f"{where}: " + (" ".join(name for bit, name in bits if features & bit)
                                     or "none") for where, bits in _OFFLOADS)


def gso_error(frame: memoryview, hdr: net.NetHeader, host_tso: int) -> str | None:
    """Why a guest GSO frame is unusable (None if it is fine): only the TCP types offered
    and negotiated, a gso_size, a hdr_len within the frame, and IP length fields that cover
    the whole frame (they do for a GSO frame: it is one IP packet before segmentation)."""
    kind = hdr.gso_type & ~net.GSO_ECN
    if kind == net.GSO_TCPV4 and host_tso & net.F_HOST_TSO4:
        if len(frame) < ETH_HLEN + ip.IPV4_HLEN + TCP_HLEN:
            return "GSO frame shorter than its headers"
        ethertype, vihl, tot_len, proto = _ETH_IP.unpack_from(frame)
        if ethertype != eth.ETH_P_IP or vihl >> 4 != 4 or proto != socket.IPPROTO_TCP:
            return "TCPV4 GSO frame that is not TCP over IPv4"
        if ETH_HLEN + tot_len != len(frame):
            return f"TCPV4 GSO frame of {len(frame)} bytes, IP total length {tot_len}"
    elif kind == net.GSO_TCPV6 and host_tso & net.F_HOST_TSO6:
        if len(frame) < ETH_HLEN + ip.IPV6_HLEN + TCP_HLEN:
            return "GSO frame shorter than its headers"
        ethertype, plen, nexthdr = _ETH_IP6.unpack_from(frame)
        if ethertype != eth.ETH_P_IPV6 or nexthdr != socket.IPPROTO_TCP:
            return "TCPV6 GSO frame that is not TCP over IPv6 without extension headers"
        if ETH_HLEN + ip.IPV6_HLEN + plen != len(frame):
            return f"TCPV6 GSO frame of {len(frame)} bytes, IPv6 payload length {plen}"
    else:
        return f"GSO type {hdr.gso_type} not negotiated"
    if hdr.gso_size == 0 or hdr.hdr_len > len(frame):
        return f"GSO frame with gso_size {hdr.gso_size}, hdr_len {hdr.hdr_len}"
    return None


class _Device(net.NetDevice):
    """The virtio-net device the back end drives; every event goes to the link."""

    features = NET_FEATURES
    num_queues = 2 * QUEUE_PAIRS_MAX

    def __init__(self, link: VhostUserLink) -> None:
        self.link = link
        self.acked = 0
        # with the guest's addresses to move, DEVICE_STATE is offered (see save_state)
        self.max_state_size = migrate.MAX_STATE_SIZE if link.guest is not None else 0

    def save_state(self) -> bytes:
        assert self.link.guest is not None  # offered only then
        return migrate.save(self.link.guest,
                            self.link.conns.save() if self.link.conns is not None else ())

    def load_state(self, data: bytes) -> None:
        assert self.link.guest is not None
        migrate.load(self.link.guest, data, self.link.conns)

    def state_checked(self, direction: Direction, ok: bool) -> None:
        if ok and direction == Direction.SAVE and self.link.on_migrated is not None:
            self.link._loop.call_later(0, self.link.on_migrated)  # after the reply

    def features_set(self, features: int) -> None:
        self.acked = features
        self.link.features_set(features)

    def queue_started(self, vq: VirtQueue) -> None:
        self.link.queues_changed()

    def queue_stopped(self, vq: VirtQueue) -> None:
        self.link.queue_stopped(vq)

    def queue_enabled(self, vq: VirtQueue, enabled: bool) -> None:
        self.link.queues_changed()
        if vq.index & 1 and vq.index != net.TX_QUEUE:  # a multiqueue guest's other pairs
            log.debug("vhost-user queue pair %d %s", vq.index // 2,
                      "enabled" if enabled else "disabled")
            if enabled and self.link.connected:
                self.link.tx_pass(vq.index)  # frames may wait in it

    def queue_kicked(self, vq: VirtQueue) -> None:
        index = vq.index
        if index & 1:
            self.link.tx_kicked(index)
        elif index == net.RX_QUEUE:
            self.link.rx_kicked()
        # the other RX queues: their buffers are never used (everything goes out on the first)


class VhostUserLink(VhostRx):
    """One vhost-user front end (or none). Like StreamLink, the object outlives its front ends:
    each new connection is attached to the same link with a fresh device."""

    def __init__(
        self,
        loop: Loop,
        on_frames: FrameHandler,
        pcap: PcapWriter | None = None,
        on_disconnect: Callable[[], None] | None = None,
        *,
        frame_max: int = ETH_MAX_FRAME,
        tx_batch: int = TX_BATCH,
        bounce_slots: int = BOUNCE_SLOTS,
        guest: GuestAddrs | None = None,
    ) -> None:
        super().__init__(loop, on_frames, pcap, frame_max, bounce_slots)
        self.on_disconnect = on_disconnect
        self.guest = guest  # what a live migration moves (None: DEVICE_STATE not offered)
        self.repair: RepairServer | None = None  # the TCP_REPAIR helper's (listen_repair)
        # what moves TCP connections in a migration (the daemon's; None: they do not move)
        self.conns: migrate.ConnMover[Any] | None = None
        self.on_migrated: Callable[[], None] | None = None  # the source's migration completed
        self.tx_batch = tx_batch
        self._tx = net.TxGather(tx_batch)  # guest frames a batch at a time, found in C
        self.backend = None
        self.device: _Device | None = None
        # GUEST_TSO4/6 (with GUEST_CSUM: 64 KiB TCP frames), GUEST_CSUM without --pcap,
        # and rx_fill() with mergeable buffers: a new LinkCaps per front end's features
        self.caps = NO_CAPS
        self._host_tso = 0  # HOST_TSO4/6 negotiated: the GSO frames the guest may send
        self._was_connected = False
        self._tx_scheduled: set[int] = set()  # TX queues with a pass due
        self._tx_consumer: TxConsumer | None = None  # offered the guest's frames first
        self._tx_bulk: set[int] = set()  # their last pass was a bulk one: coalesce the next kick
        # counters, for logs and tests (rx: from the guest, as StreamLink; tx_*: vhost_rx.py)
        self.rx_frames = 0
        self.rx_gso = 0  # GSO (TSO) frames from the guest
        self.kicks_coalesced = 0  # TX kicks served TX_COALESCE later (after a bulk pass)
        # of rx_frames, those a multiqueue guest sent on its other pairs, by pair (numbered
        # from 0, as the guest's tx-N queues are)
        self.rx_frames_per_pair: dict[int, int] = {}
        self.resets = 0
        loop.add_flush_hook(self.flush)

    # --- front end management ------------------------------------------------------------
    def attach(self, sock: socket.socket) -> None:
        """Serve the vhost-user front end on `sock` (a connected UNIX stream socket)."""
        if self.backend is not None:
            raise RuntimeError("vhost-user link already has a front end")
        sock.setblocking(False)
        self._reset_state()
        self.device = _Device(self)
        self.backend = VhostUserBackend(sock, self._loop, self.device, on_close=self._closed)

    def disconnect(self, reason: str = "closed") -> None:
        """Drop the front end (if any); on_disconnect is then called (by _closed)."""
        if self.backend is not None:
            self.backend.close(reason)

    def _closed(self, reason: str) -> None:
        # VhostUserBackend.close() ran: rings stopped, memory unmapped, fds closed.
        taken = self._tx  # frames the data plane's C took count as frames from the guest
        log.info("vhost-user front end gone: %d frames from the guest, %d to it "
                 "(%d written in place, %d dropped), %d in place over several buffers, "
                 "TSO frames %d from the guest, %d to it, %d data frames bounced, "
                 "%d TX kicks coalesced, %d frames read and committed in one call, "
                 "%d frames from the guest taken by the data plane's C",
                 self.rx_frames + taken.taken, self.tx_frames, self.tx_zero_copy,
                 self.tx_dropped, self.tx_scattered, self.rx_gso + taken.taken_gso,
                 self.tx_gso, self.tx_bounced, self.kicks_coalesced, self.tx_filled,
                 taken.taken)
        if self.rx_frames_per_pair:
            log.info("vhost-user: of those, from queue pairs after the first: %s",
                     ", ".join(f"pair {pair}: {n}"
                               for pair, n in sorted(self.rx_frames_per_pair.items())))
        self.backend = None
        self.device = None
        self._reset_state()
        self.resets += 1
        if self.on_disconnect is not None:
            self.on_disconnect()

    def _reset_state(self) -> None:
        # (_tx_scheduled stays: a pass still due finds no queue, and takes its index out)
        self._tx_bulk.clear()
        self._was_connected = False
        self.caps = NO_CAPS
        self._host_tso = 0
        self._reset_rx()

    def close(self) -> None:
        """Drop the front end without calling on_disconnect; unhook from the loop."""
        self.on_disconnect = None
        if self.backend is not None:
            self.backend.close("link closed")
        if self.repair is not None:
            self.repair.close()
            self.repair = None
        if self.conns is not None:
            self.conns.close()
            self.conns = None
        self._loop.remove_flush_hook(self.flush)

    def listen_repair(self, path: str | None) -> None:
        """Make the TCP_REPAIR helper's socket at `path` ("none" or None: no socket).
        OSError if it cannot be made."""
        if path is not None and path != "none":
            self.repair = RepairServer(self._loop, path)

    def features_set(self, features: int) -> None:
        """The front end acked `features` (the device's features_set())."""
        self._rx_features(features)
        self._host_tso = features & (net.F_HOST_TSO4 | net.F_HOST_TSO6)
        # the spec makes GUEST_TSO depend on GUEST_CSUM: without it, no GSO frame goes out;
        # with --pcap, frames are summed anyway (shown as a guest without offload sees them)
        unchecked = self.csum_offload and self.pcap is None
        self.caps = LinkCaps(tso4=self.csum_offload and bool(features & net.F_GUEST_TSO4),
                             tso6=self.csum_offload and bool(features & net.F_GUEST_TSO6),
                             l4_csum=not unchecked, guest_fill=unchecked and self._mergeable)

    def queues_changed(self) -> None:
        """A queue started, stopped, or was enabled or disabled: the link may be running now,
        or no longer."""
        now = self.connected
        if now and not self._was_connected:
            features = self.backend.acked_features if self.backend else 0
            log.info("vhost-user device running (features %#x; offloads %s)", features,
                     offloads(features))
            self._was_connected = True
            self._wake()  # data may have waited for the guest
            # and the guest may have queued frames before enabling the rings (these passes
            # also set _tx_bulk afresh: a new front end's first kick is not held)
            for index in self._tx_queues():
                self.tx_pass(index)
        elif not now:
            self._was_connected = False

    def queue_stopped(self, vq: VirtQueue) -> None:
        """The front end stopped `vq` (GET_VRING_BASE follows)."""
        if vq.index == net.RX_QUEUE:
            # Chains handed out and never committed go back before GET_VRING_BASE reports
            # the index (it is read after this), so whoever resumes the ring offers them again.
            self._release(vq)
            self._short = None  # a restarted ring may hold other buffers at the same index
        self.queues_changed()

    def _broken(self, where: str, e: Exception) -> None:
        log.warning("vhost-user %s: %s: disconnecting the front end", where, e)
        self.disconnect(f"{where}: {e}")

    # --- TX: frames from the guest -------------------------------------------------------
    def _tx_queues(self) -> list[int]:
        """The TX queues of the pairs the front end has enabled."""
        backend = self.backend
        if backend is None:
            return []
        return [vq.index for vq in backend.queues[net.TX_QUEUE::2] if vq.ready and vq.enabled]

    def tx_pass(self, index: int = net.TX_QUEUE) -> None:
        """Up to tx_batch frames from TX queue `index` to the dispatcher."""
        backend = self.backend  # _queue(index), spelled out: one call fewer per pass
        if backend is None or backend.closed:
            return
        vq = backend.queues[index]
        if not (vq.ready and vq.enabled):
            return
        consumer = self._tx_consumer if self.pcap is None else None
        try:
            if consumer is not None:
                consumer.begin()
                heads, found, gso = self._tx.tx_frames(vq, self.tx_batch, consumer.take,
                                                       consumer.end, consumer.arg,
                                                       self._host_tso)
            else:
                heads, found, gso = self._tx.tx_frames(vq, self.tx_batch)
        except VirtQueueError as e:
            self._broken("TX queue", e)
            return
        frames: list[memoryview] = []
        size = 0
        for i, frame in enumerate(found):
            if frame is None:
                _ratelimited.debug("vu-tx-short", "dropped a guest frame: %s",
                                   "TX chain shorter than the virtio-net header")
                continue
            n = len(frame)
            if n < ETH_HLEN:
                continue
            size += n
            # With NEEDS_CSUM (CSUM negotiated) the L4 checksum field holds only the
            # pseudo-header sum; payloads go to host sockets and pcap shows it as is.
            hdr = gso.get(i) if gso else None
            if hdr is not None:
                # TSO: one TCP packet of up to 64 KiB; TCP writes its payload to the host
                # socket like any other, so it goes on whole once it is what it claims to be
                why = gso_error(frame, hdr, self._host_tso)
                if why is not None:
                    _ratelimited.debug("vu-tx-gso", "dropped a guest frame: %s", why)
                    continue
                self.rx_gso += 1
            frames.append(frame)
        if size + self._tx.taken_bytes >= TX_BULK_BYTES:  # the data plane's frames count
            self._tx_bulk.add(index)
        else:
            self._tx_bulk.discard(index)
        try:
            if index != net.TX_QUEUE:  # a multiqueue guest's other pairs, for the log
                seen = len(frames) + self._tx.taken_last  # the data plane's C took some
                if seen:
                    counts, pair = self.rx_frames_per_pair, index // 2
                    counts[pair] = counts.get(pair, 0) + seen
            if frames:
                self.rx_frames += len(frames)
                # Link._deliver() spelled out: one Python call fewer per TX pass
                pcap = self.pcap
                if pcap is not None:
                    for view in frames:
                        pcap.write(view)
                self.on_frames(frames)
        finally:
            # The frames were only valid during the call: now the buffers go back.
            try:
                if self.backend is backend and vq.ready:
                    vq.push_flat([x for head in heads for x in (head, 0)])
                    vq.flush()
            finally:
                if consumer is not None:
                    consumer.after()  # what the consumer's C left for Python, whatever came
        if (len(heads) == self.tx_batch or self._tx.full) and index not in self._tx_scheduled:
            self._tx_scheduled.add(index)  # the ring may hold more: no kick will say so
            self._loop.call_later(0, functools.partial(self._tx_again, index))

    def set_tx_consumer(self, consumer: TxConsumer | None) -> None:
        self._tx_consumer = consumer

    def tx_kicked(self, index: int = net.TX_QUEUE) -> None:
        """A TX kick: served now, or TX_COALESCE later after a bulk pass. Meanwhile the kick
        stays disarmed (nothing popped, avail_event not moved: with EVENT_IDX no more kicks
        come) and the deferred pass re-arms it as every pass does."""
        if index in self._tx_scheduled:
            return  # a pass is due already: it takes this kick's frames
        if index in self._tx_bulk:
            self._tx_scheduled.add(index)
            self.kicks_coalesced += 1
            self._loop.call_later(TX_COALESCE, functools.partial(self._tx_again, index))
            return
        self.tx_pass(index)

    def _tx_again(self, index: int = net.TX_QUEUE) -> None:
        self._tx_scheduled.discard(index)
        self.tx_pass(index)


class VhostUserListener(ForwardingLink):
    """`--vhost-user -s PATH`: a UNIX listener (same probing as the stream socket) feeding one
    VhostUserLink (`.link`), one front end at a time; with `one_off` the first front end's
    departure calls `on_exit` (default: stop the loop). Itself a Link forwarding to `.link`."""

    link: VhostUserLink

    def __init__(
        self,
        loop: Loop,
        path: str | None,
        on_frames: FrameHandler,
        pcap: PcapWriter | None = None,
        one_off: bool = False,
        on_exit: ExitCallback | None = None,
        *,
        frame_max: int = ETH_MAX_FRAME,
        probe_pattern: str = DEFAULT_PROBE_PATTERN,
        probe_count: int = DEFAULT_PROBE_COUNT,
        guest: GuestAddrs | None = None,
        repair_path: str | None = None,
    ) -> None:
        super().__init__(on_frames, pcap)
        self.peer_name = "front end"
        self.one_off = one_off
        self.on_exit: ExitCallback = on_exit if on_exit is not None else loop.stop
        self.link = VhostUserLink(loop, on_frames, pcap, on_disconnect=self._peer_gone,
                                  frame_max=frame_max, guest=guest)
        self._listener = listen_for(loop, path, lambda conn: self.link.attach(conn),
                                    lambda: self.link.backend is not None, probe_pattern,
                                    probe_count, self.link.close)
        self.path: str = self._listener.path
        if repair_path is None:  # passt's default, next to the vhost-user socket: optional
            try:
                self.link.listen_repair(default_path(self.path))
            except OSError as e:
                log.warning("TCP_REPAIR helper socket %s not usable: %s",
                            default_path(self.path), e)
        else:
            try:
                self.link.listen_repair(repair_path)
            except OSError:
                self.close()
                raise

def vhost_link_from_fd(
    loop: Loop,
    fd: int,
    on_frames: FrameHandler,
    pcap: PcapWriter | None = None,
    on_exit: ExitCallback | None = None,
    *,
    frame_max: int = ETH_MAX_FRAME,
    guest: GuestAddrs | None = None,
    repair_path: str | None = None,
) -> VhostUserLink:
    """`--vhost-user --fd N` (qemu's -netdev passt,vhost-user=on): a connected socket; the
    front end's departure calls `on_exit` (default: stop the loop), as --fd implies one-off.
    No socket path to put the TCP_REPAIR helper's next to: only an explicit `repair_path`."""
    sock = connected_socket(fd, unix_only=True)
    link = VhostUserLink(loop, on_frames, pcap, on_disconnect=on_exit or loop.stop,
                         frame_max=frame_max, guest=guest)
    try:
        link.listen_repair(repair_path)
    except OSError:
        sock.close()
        link.close()
        raise
    link.attach(sock)
    return link
