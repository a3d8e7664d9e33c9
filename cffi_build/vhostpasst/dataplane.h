/* The TCP data plane's shared records (dataplane.c): one struct dp_flow per connection, the
 * store of every field both Python (vhostpasst/proto/tcp/) and the C read or write, so that
 * neither keeps a copy of the other's state; and the table of connections handed to the C.
 * Declared once here and in dataplane_build.py's cdef (the same text: see there). */
#ifndef VP_DATAPLANE_H
#define VP_DATAPLANE_H

#include <stdint.h>

/* followups: what the C left for Python, per connection, in the order Python does them */
#define DP_DISCARD 1	/* the guest acknowledged data: drop it from the socket */
#define DP_KICK 2	/* its window has room: read the socket (to_guest._from_sock) */
#define DP_ARM_RTO 4	/* restart the retransmission timer with a new loop timer */

struct dp_flow {
	/* identity, set once */
	uint32_t id;
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
	/* the C's own */
	uint32_t followups;
	uint32_t declined_pass;
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
	uint32_t ntouched, touched_cap;
	uint64_t taken, declined;	/* counters */
};

#endif
