/* The TCP data plane's shared records (dataplane.c): one struct dp_flow per connection, the
 * store of every field both Python (vhostpasst/proto/tcp/) and the C read or write, so that
 * neither keeps a copy of the other's state; and the table of connections handed to the C.
 * Declared once here and in dataplane_build.py's cdef (the same text: see there). */
#ifndef VP_DATAPLANE_H
#define VP_DATAPLANE_H

#include <stdint.h>

/* followups: what the C left for Python, per connection, in the order Python does them */
#define DP_SEEN 1	/* a frame was taken (nothing else for Python, by itself) */
#define DP_ARM_RTO 2	/* restart the retransmission timer with a new loop timer */
#define DP_DISCARD 4	/* the guest acknowledged data: drop it from the socket */
#define DP_RESET 8	/* the socket refused the guest's data (an error): reset */
#define DP_WANT_OUT 16	/* the socket took part of it: a window update once writable */
#define DP_KICK 32	/* its window has room: read the socket (to_guest._from_sock) */
#define DP_SEND_ACK 64	/* the guest's data wants an ACK (from_guest._send_ack) */

struct dp_flow {
	/* identity, set once */
	uint32_t id;
	int32_t fd;		/* the host socket */
	int32_t six;
	uint8_t gaddr[16], faddr[16];	/* IPv4: the first four bytes */
	uint16_t gport, fport;
	int32_t in_table;
	/* shared state */
	int32_t state;
	int32_t tap_fin_rcvd;
	int32_t fin_sent;
	uint32_t fin_seq;
	uint32_t seq_from_tap, seq_ack_to_tap;
	uint32_t seq_to_tap, seq_max, seq_ack_from_tap, wnd_from_tap, ws_from_tap;
	uint32_t recover, retrans, dup_acks;
	uint64_t discard_due;
	int32_t rtt_pending;
	uint32_t rtt_seq;
	double rtt_time, srtt, rttvar, rto;	/* srtt < 0: no sample yet */
	int32_t rto_armed, rto_timer_set;
	double rto_when, rto_deadline, last_seen;
	/* host -> guest (dp_fill) */
	int32_t stalled, drained, peek_full, peer_closed, local, sndbuf_fixed, poll_fast, ack_due;
	uint32_t mss, ws_to_tap, wnd_to_tap, ack_base, sndbuf;	/* sndbuf 0: ask the socket */
	uint32_t snd_wnd_max;	/* the largest window the far end showed the host kernel */
	int32_t wnd_short;	/* the window shown is below a guest segment and will open */
	int32_t data_ack_valid;	/* the last data frames' ACK number and window (data_ack_wnd) */
	uint32_t data_ack_seq, data_ack_ack, data_ack_wnd;
	double data_ack_time;
	int32_t tmpl_valid;	/* the header template for data frames (TcpConn.template) */
	uint8_t tmpl[74], tmpl_mac[6];
	uint32_t pseudo;
	/* the C's own */
	uint32_t followups;
	uint32_t declined_pass;
	uint32_t pending;	/* bytes of the guest's data taken this pass, not written yet */
	int32_t write_errno;	/* with DP_RESET: why */
};

/* What dp_fill() left for Python (its res[0]), beside the queue's bookkeeping */
#define DP_FILL_EVENTS 1	/* stalled or drained changed: the socket's epoll mask */
#define DP_FILL_ARM_ACK 2	/* the ACK timer (polling the far end's ACK or window) */
#define DP_FILL_ARM_RTO 4	/* a new loop timer for the retransmission timeout */

/* dp_fill()'s outcomes */
#define DP_FILL_PYTHON 0	/* nothing done (but the discard): Python's _from_sock() */
#define DP_FILL_DONE 1		/* handled: the queue's bookkeeping from out[], res[0] */

/* The link's RX queue as vhost_rx.py keeps it, for dp_fill()'s call of virtio's vr_rx_fill()
 * (ring.c; its arguments: see there). Addresses of virtio's and tcp_vu.c's objects are kept
 * as integers (they belong to other cffi modules). Per call: last_avail, hint, indirect,
 * rearm, tso4/tso6; the rest when the queue is (re)mapped. */
struct dp_rx {
	uintptr_t fill, reader, writer;	/* vr_rx_fill, vp_tcp_read, vp_tcp_fill_writer */
	uintptr_t reader_arg, writer_arg;	/* struct vp_tcp_read *, struct vp_tcp_fill * */
	uintptr_t ctx, regions, used, recs, chrecs, elems, spare, out;
	uint32_t nregions, num, last_avail, hint, max_views;
	uint64_t used_len;
	int32_t indirect, rearm, tso4, tso6;
	int64_t read;		/* out: bytes read (or -errno) */
};

/* One taken payload, written at the end of the pass (one sendmsg per connection). */
struct dp_payload {
	struct dp_flow *f;
	const uint8_t *p;
	uint32_t len;
};

struct dp_table {
	struct dp_flow **slots;	/* open addressing, linear probing; NULL: empty */
	uint32_t cap;		/* a power of two */
	uint32_t count;
	uint32_t pass;		/* one per vr_tx_offer() call: dp_pass_begin() */
	uint32_t established;	/* ESTABLISHED as Python numbers it */
	double rto_min, rto_max;
	double now;		/* 0: the clock (tests set it) */
	uint8_t guest_mac[6], our_mac[6];
	uint32_t seen4;		/* the guest's IPv4 source the dispatcher saw last (host order) */
	uint8_t learned6[16];	/* and its IPv6 one */
	uint32_t *touched;	/* ids of connections with followups, this pass */
	struct dp_flow **touched_flows;	/* the same connections */
	uint32_t ntouched, touched_cap;
	struct dp_payload *payloads;	/* this pass's, in ring order */
	uint32_t npayloads, payloads_cap;
	uint64_t taken, declined, written;	/* counters: frames, frames, bytes */
	uint64_t split;	/* frames declined after the C took data of theirs in the pass */
	uint64_t fills;	/* dp_fill() calls that sent frames and needed no Python after */
};

#endif
