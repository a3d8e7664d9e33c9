/* The TCP data plane: the guest's ACKs and in-sequence data on established connections,
 * taken in C from vhost-user's TX frames (virtio's vr_tx_offer() calls dp_take_tx() per frame,
 * then dp_tx_end() once); and, further down, the read that fills the guest's buffers from such
 * a connection's socket (dp_fill(), see there).
 *
 * Python (vhostpasst/proto/tcp/) stays the authority: it puts a connection in the table when
 * it is established and takes it out when it closes; the connection's fields both sides use
 * live in its struct dp_flow (dataplane.h), which TcpConn reads and writes as attributes, so
 * there is one copy of the state. For a frame the C takes it does exactly what
 * from_guest.FromGuest._tap_segments() and _guest_ack() do for a batch of such segments:
 * the ACK at once, the payloads gathered and written with one sendmsg() per connection at
 * the end of the pass (dp_tx_end(), while the frames are still the guest's), and leaves what
 * needs Python (the socket's discard, the read that fills the guest's window, our ACK, a new
 * loop timer, a reset) as followups on the connection, listed in `touched` for the caller.
 *
 * Declined, untouched, for Python's path: anything but an IPv4 or IPv6 TCP segment without
 * TCP options, IP options or extension headers, flags ACK or ACK|PSH, from the guest MAC and
 * source address the dispatcher already learned (a GSO frame only of a negotiated type, with
 * IP lengths covering the frame); a connection not in the table, not ESTABLISHED, or whose FIN
 * went either way; a segment not at the next sequence number (old, a keep-alive, a hole);
 * the third duplicate ACK (a fast retransmit); a full `touched` or payload list. Once a
 * connection's frame is declined, its later frames of the same pass are too: Python must see
 * them in order (it writes what the C took first: dp_tx_end() runs before the dispatcher).
 *
 * Guest memory: the frame pointer was checked by virtio against its region for `len` bytes;
 * the headers are copied once into a local and parsed from there (the guest may rewrite its
 * buffer meanwhile). */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "dataplane.h"

#define ETH_HLEN 14
#define IP4_HLEN 20
#define IP6_HLEN 40
#define TCP_HLEN 20
#define TCP_ACK 0x10
#define TCP_PSH 0x08
#define GSO_TCPV4 1
#define GSO_TCPV6 4
#define GSO_ECN 0x80
#define F_HOST_TSO4 (1ull << 11)
#define F_HOST_TSO6 (1ull << 12)
#define IOV_CHUNK 1024	/* UIO_MAXIOV */
#define MAX_WINDOW (65535u << 8)	/* conn.py MAX_WINDOW */
#define DUP_ACKS_FAST 3

static const uint8_t loopback6[16] = { [15] = 1 };

static inline int seq_lt(uint32_t a, uint32_t b)
{
	uint32_t d = b - a;

	return d != 0 && d < 0x80000000u;
}

static inline int seq_le(uint32_t a, uint32_t b)
{
	return a == b || seq_lt(a, b);
}

static inline uint16_t get16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static inline uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* --- the table: connections by (six, guest address and port, far address and port) ---- */

static uint32_t dp_hash(int six, const uint8_t *gaddr, uint16_t gport, const uint8_t *faddr,
			uint16_t fport)
{
	uint32_t h = 2166136261u ^ (uint32_t)six;
	unsigned i, n = six ? 16 : 4;

	for (i = 0; i < n; i++)
		h = (h ^ gaddr[i]) * 16777619u;
	for (i = 0; i < n; i++)
		h = (h ^ faddr[i]) * 16777619u;
	h = (h ^ gport) * 16777619u;
	h = (h ^ fport) * 16777619u;
	return h ^ (h >> 15);
}

static int dp_same(const struct dp_flow *f, int six, const uint8_t *gaddr, uint16_t gport,
		   const uint8_t *faddr, uint16_t fport)
{
	unsigned n = six ? 16 : 4;

	return f->six == six && f->gport == gport && f->fport == fport &&
	       !memcmp(f->gaddr, gaddr, n) && !memcmp(f->faddr, faddr, n);
}

static struct dp_flow *dp_lookup(const struct dp_table *t, int six, const uint8_t *gaddr,
				 uint16_t gport, const uint8_t *faddr, uint16_t fport)
{
	uint32_t mask = t->cap - 1, i;
	struct dp_flow *f;

	if (!t->cap)
		return NULL;
	for (i = dp_hash(six, gaddr, gport, faddr, fport) & mask; (f = t->slots[i]);
	     i = (i + 1) & mask)
		if (dp_same(f, six, gaddr, gport, faddr, fport))
			return f;
	return NULL;
}

/* Returns 0, or -1 if the table is full (at most cap / 2 entries) or holds that key. */
int dp_insert(struct dp_table *t, struct dp_flow *f)
{
	uint32_t mask = t->cap - 1, i;

	if (f->in_table || !t->cap || t->count >= t->cap / 2 ||
	    dp_lookup(t, f->six, f->gaddr, f->gport, f->faddr, f->fport))
		return -1;
	for (i = dp_hash(f->six, f->gaddr, f->gport, f->faddr, f->fport) & mask; t->slots[i];
	     i = (i + 1) & mask)
		;
	t->slots[i] = f;
	t->count++;
	f->in_table = 1;
	return 0;
}

/* Linear probing's deletion: later entries of the run move back into the hole. */
void dp_remove(struct dp_table *t, struct dp_flow *f)
{
	uint32_t mask = t->cap - 1, i, j, home;

	if (!f->in_table || !t->cap)
		return;
	for (i = dp_hash(f->six, f->gaddr, f->gport, f->faddr, f->fport) & mask;
	     t->slots[i] && t->slots[i] != f; i = (i + 1) & mask)
		;
	f->in_table = 0;
	if (t->slots[i] != f)
		return;
	t->slots[i] = NULL;
	t->count--;
	for (j = (i + 1) & mask; t->slots[j]; j = (j + 1) & mask) {
		struct dp_flow *g = t->slots[j];

		home = dp_hash(g->six, g->gaddr, g->gport, g->faddr, g->fport) & mask;
		/* g may move to the hole i unless its home lies cyclically in (i, j] */
		if ((j > i && (home <= i || home > j)) || (j < i && home <= i && home > j)) {
			t->slots[i] = g;
			t->slots[j] = NULL;
			i = j;
		}
	}
}

/* A new pass over a batch of frames: the clock read once, `touched` emptied. */
void dp_pass_begin(struct dp_table *t)
{
	t->pass++;
	t->ntouched = 0;
	t->npayloads = 0;
}

static double dp_now(const struct dp_table *t)
{
	struct timespec ts;

	if (t->now > 0)
		return t->now;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* --- the guest's ACK (from_guest._guest_ack, timers._rtt_sample, timers._arm_rto) --------- */

static void dp_rtt_sample(const struct dp_table *t, struct dp_flow *f, double r)
{
	double d, var;

	if (f->srtt < 0) {
		f->srtt = r;
		f->rttvar = r / 2;
	} else {
		d = f->srtt - r;
		f->rttvar = 0.75 * f->rttvar + 0.25 * (d < 0 ? -d : d);
		f->srtt = 0.875 * f->srtt + 0.125 * r;
	}
	var = 4 * f->rttvar;
	var = f->srtt + (var < 0.001 ? 0.001 : var);
	var = var < t->rto_min ? t->rto_min : var;
	f->rto = var > t->rto_max ? t->rto_max : var;
}

static void dp_followup(struct dp_table *t, struct dp_flow *f, uint32_t what)
{
	if (!f->followups) {
		t->touched_flows[t->ntouched] = f;
		t->touched[t->ntouched++] = f->id;
	}
	f->followups |= what;
}

/* The retransmission timer restarted: move the deadline of the loop timer that runs, or
 * leave a new loop timer to Python. */
static void dp_restart_rto(struct dp_table *t, struct dp_flow *f, double now)
{
	double when = now + f->rto;

	if (f->rto_timer_set && when >= f->rto_when) {
		f->rto_deadline = when;
		f->rto_armed = 1;
		return;
	}
	dp_followup(t, f, DP_ARM_RTO);
}

/* Returns 1 if taken, 0 to leave the ACK to Python (nothing changed). `data`: the segment
 * carries a payload (never a duplicate ACK then). */
static int dp_guest_ack(struct dp_table *t, struct dp_flow *f, uint32_t ack, uint32_t window,
			int data)
{
	uint64_t scaled = (uint64_t)window << (f->ws_from_tap & 31);
	uint32_t wnd = scaled < MAX_WINDOW ? (uint32_t)scaled : MAX_WINDOW;
	double now = dp_now(t);

	if (seq_lt(f->seq_max, ack)) {
		/* acknowledges what we never sent: ignored */
	} else if (seq_lt(f->seq_ack_from_tap, ack)) {
		f->discard_due += (uint32_t)(ack - f->seq_ack_from_tap);
		f->seq_ack_from_tap = ack;
		if (seq_lt(f->seq_to_tap, ack))
			f->seq_to_tap = ack;
		if (f->rtt_pending && seq_le(f->rtt_seq, ack)) {
			dp_rtt_sample(t, f, now - f->rtt_time);
			f->rtt_pending = 0;
		}
		f->retrans = 0;
		f->dup_acks = 0;
		f->wnd_from_tap = wnd;
		if (f->seq_to_tap == ack) {
			f->rto_armed = 0;
			/* a new timer an earlier ACK of the pass asked for is not wanted now */
			f->followups &= ~DP_ARM_RTO;
		} else {
			dp_restart_rto(t, f, now);
		}
		dp_followup(t, f, DP_DISCARD | DP_KICK);
	} else if (ack == f->seq_ack_from_tap) {
		int changed = wnd != f->wnd_from_tap;

		int dup = !changed && !data && f->seq_max != ack && !seq_lt(ack, f->recover);

		if (dup && f->dup_acks + 1 >= DUP_ACKS_FAST)
			return 0;	/* the fast retransmit is Python's */
		f->wnd_from_tap = wnd;
		if (f->seq_max == ack)
			f->retrans = 0;
		else if (dup)
			f->dup_acks++;
		if (changed)
			dp_followup(t, f, DP_KICK);
	}
	f->last_seen = now;
	return 1;
}

/* --- the frame ------------------------------------------------------------------------ */

/* A vr_tx_consumer (cffi_build/virtio/net.c): 1 if the frame was taken. */
int dp_take_tx(void *arg, const uint8_t *frame, uint32_t len, const uint8_t *vnet_hdr,
	       uint64_t offloads)
{
	struct dp_table *t = arg;
	uint8_t h[ETH_HLEN + IP6_HLEN + TCP_HLEN], vh[6];
	uint32_t end, l4, src4, seq, ack, payload, gso;
	const uint8_t *src, *dst, *tcp;
	struct dp_flow *f;
	int six;

	memcpy(vh, vnet_hdr, sizeof(vh));	/* flags, gso_type, hdr_len, gso_size */
	gso = vh[1] & ~GSO_ECN;
	if (len < ETH_HLEN + IP4_HLEN + TCP_HLEN)
		goto no;
	memcpy(h, frame, len < sizeof(h) ? len : sizeof(h));	/* each guest byte read once */
	if (memcmp(h + 6, t->guest_mac, 6))
		goto no;
	if (h[12] == 0x08 && h[13] == 0x00) {
		six = 0;
		l4 = ETH_HLEN + IP4_HLEN;
		end = ETH_HLEN + get16(h + ETH_HLEN + 2);
		src = h + ETH_HLEN + 12;
		dst = h + ETH_HLEN + 16;
		src4 = get32(src);
		if (h[ETH_HLEN] != 0x45 || h[ETH_HLEN + 9] != 6 ||
		    (get16(h + ETH_HLEN + 6) & 0x3FFF) || src[0] == 127 || dst[0] == 127 ||
		    src4 != t->seen4 || (vh[1] && (gso != GSO_TCPV4 || !(offloads & F_HOST_TSO4))))
			goto no;
	} else if (h[12] == 0x86 && h[13] == 0xDD) {
		six = 1;
		if (len < ETH_HLEN + IP6_HLEN + TCP_HLEN)
			goto no;
		l4 = ETH_HLEN + IP6_HLEN;
		end = l4 + get16(h + ETH_HLEN + 4);
		src = h + ETH_HLEN + 8;
		dst = h + ETH_HLEN + 24;
		if (h[ETH_HLEN] >> 4 != 6 || h[ETH_HLEN + 6] != 6 ||
		    !memcmp(src, loopback6, 16) || !memcmp(dst, loopback6, 16) ||
		    memcmp(src, t->learned6, 16) ||
		    (vh[1] && (gso != GSO_TCPV6 || !(offloads & F_HOST_TSO6))))
			goto no;
	} else {
		goto no;
	}
	/* a GSO frame is one IP packet before segmentation: its lengths cover the frame */
	if (vh[1] && (end != len || !(vh[4] | vh[5]) || (uint32_t)(vh[2] | vh[3] << 8) > len))
		goto no;
	tcp = h + l4;
	/* no TCP options, flags ACK or ACK|PSH (NS clear) */
	if (end > len || end < l4 + TCP_HLEN || tcp[12] != (TCP_HLEN / 4) << 4 ||
	    (tcp[13] != TCP_ACK && tcp[13] != (TCP_ACK | TCP_PSH)))
		goto no;
	payload = end - l4 - TCP_HLEN;
	f = dp_lookup(t, six, src, get16(tcp), dst, get16(tcp + 2));
	if (!f)
		goto no;
	seq = get32(tcp + 4);
	ack = get32(tcp + 8);
	if (f->declined_pass == t->pass || f->state != (int32_t)t->established ||
	    f->tap_fin_rcvd || f->fin_sent || seq != f->seq_from_tap + f->pending ||
	    (!f->followups && t->ntouched >= t->touched_cap) ||
	    (payload && t->npayloads >= t->payloads_cap) ||
	    !dp_guest_ack(t, f, ack, get16(tcp + 14), payload != 0)) {
		if (f->pending && f->declined_pass != t->pass)
			t->split++;	/* Python's part of the pass comes after our write */
		f->declined_pass = t->pass;
		goto no;
	}
	dp_followup(t, f, DP_SEEN);
	if (payload) {
		struct dp_payload *p = &t->payloads[t->npayloads++];

		p->f = f;
		p->p = frame + l4 + TCP_HLEN;	/* within len: end <= len */
		p->len = payload;
		f->pending += payload;
	}
	t->taken++;
	return 1;
no:
	t->declined++;
	return 0;
}

/* sendmsg() of n iovecs holding `bytes`: what went, or -errno (-EAGAIN: nothing). */
static long dp_send(int fd, struct iovec *iov, uint32_t n)
{
	struct msghdr msg;
	ssize_t rc;

	memset(&msg, 0, sizeof(msg));
	msg.msg_iov = iov;
	msg.msg_iovlen = n;
	do
		rc = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
	while (rc < 0 && errno == EINTR);
	return rc < 0 ? -errno : rc;
}

/* The connection's payloads of this pass in sendmsg() calls of IOV_CHUNK iovecs
 * (from_guest._write): what the socket took moves seq_from_tap on; the rest is not
 * acknowledged (the guest sends it again) and a window update follows EPOLLOUT; an error
 * resets the connection. */
static void dp_write(struct dp_table *t, struct dp_flow *f)
{
	struct iovec iov[IOV_CHUNK];
	uint32_t i, n = 0, sent = 0, chunk = 0, left = f->pending;
	long rc;

	for (i = 0; i < t->npayloads && left; i++) {
		const struct dp_payload *p = &t->payloads[i];

		if (p->f != f)
			continue;
		iov[n].iov_base = (void *)p->p;
		iov[n].iov_len = p->len;
		chunk += p->len;
		left -= p->len;
		if (++n < IOV_CHUNK && left)
			continue;
		rc = dp_send(f->fd, iov, n);
		if (rc < 0 && rc != -EAGAIN) {
			f->write_errno = (int32_t)-rc;
			dp_followup(t, f, DP_RESET);
			break;
		}
		if (rc > 0)
			sent += (uint32_t)rc;
		if (rc < 0 || (uint32_t)rc < chunk) {
			dp_followup(t, f, DP_WANT_OUT);
			break;
		}
		n = chunk = 0;
	}
	f->seq_from_tap += sent;
	t->written += sent;
	f->pending = 0;
}

/* A vr_tx_consumer_end: the pass's payloads written, and the ACKs they want noted. */
void dp_tx_end(void *arg)
{
	struct dp_table *t = arg;
	uint32_t i;

	for (i = 0; i < t->npayloads; i++) {
		struct dp_flow *f = t->payloads[i].f;

		if (f->pending)
			dp_write(t, f);
	}
	t->npayloads = 0;
	for (i = 0; i < t->ntouched; i++) {
		struct dp_flow *f = t->touched_flows[i];

		if (!(f->followups & DP_RESET) && f->seq_from_tap != f->seq_ack_to_tap)
			f->followups |= DP_SEND_ACK;
	}
}

/* --- host -> guest: the read that fills the guest's window (to_guest._from_sock) --------- */

#include <sys/ioctl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#include "tcp_vu.h"

#define SEG_BATCH 64		/* conn.py */
#define TSO_MAX_L3 65535	/* link/base.py */
#define VNET_HDR_LEN 12
#define DATA_ACK_TTL 0.001
#define SNDBUF_SMALL (128 * 1024)
#define LOW_RTT_US 1000
#define TCP_INFO_LEN 232
#define GUEST_SEGMENT_MAX 65535	/* conn.py */
#define GSO_HDR_TCPV4 1
#define GSO_HDR_TCPV6 4

typedef long (*vr_rx_fill_fn)(void *ctx, unsigned last_avail, int indirect,
			      const void *regions, unsigned nregions, uint8_t *used,
			      size_t used_len, int rearm, unsigned count, unsigned need,
			      unsigned hdr, unsigned head, unsigned max_views, unsigned hint,
			      uint64_t *recs, uint32_t *chrecs, unsigned cap, uintptr_t reader,
			      uintptr_t reader_arg, uint64_t room, uintptr_t writer,
			      uintptr_t writer_arg, const uint8_t *plain, const uint8_t *gso,
			      uint32_t gso_from, uint32_t *elems, uint32_t *spare, uint64_t *out);

static const uint8_t data_valid_hdr[VNET_HDR_LEN] = { 2 };	/* VIRTIO_NET_HDR_F_DATA_VALID */

static inline void put_le16(uint8_t *p, uint16_t v)
{
	p[0] = v & 0xff;
	p[1] = v >> 8;
}

/* The bytes the guest acknowledged, dropped without a copy (conn.discard_acked). */
static void dp_discard(struct dp_flow *f)
{
	uint64_t left = f->discard_due;
	ssize_t n;

	f->discard_due = 0;
	while (left) {
		n = recv(f->fd, NULL, left < (1u << 24) ? left : (1u << 24),
			 MSG_TRUNC | MSG_DONTWAIT);
		if (n <= 0) {
			if (n < 0 && errno == EINTR)
				continue;
			break;
		}
		left -= (uint64_t)n;
	}
}

/* The ACK number and window field for the guest (TcpConn.ack_wnd, ESTABLISHED). */
static void dp_ack_wnd(struct dp_flow *f, uint32_t *ack_out, uint16_t *wnd_out)
{
	uint8_t info[TCP_INFO_LEN];
	socklen_t len = sizeof(info);
	int64_t wnd, eff;
	uint32_t sndbuf = f->sndbuf, ack, remote;
	int have_info;

	have_info = !getsockopt(f->fd, IPPROTO_TCP, TCP_INFO, info, &len) &&
		    len >= TCP_INFO_LEN;
	if (!sndbuf) {
		int v;
		socklen_t vl = sizeof(v);

		if (getsockopt(f->fd, SOL_SOCKET, SO_SNDBUF, &v, &vl) || v < 0) {
			sndbuf = SNDBUF_SMALL;
		} else {
			sndbuf = (uint32_t)v;
			if (f->sndbuf_fixed)
				f->sndbuf = sndbuf;
		}
	}
	eff = sndbuf < (4u << 20) ? (int64_t)sndbuf * 3 / 4 : sndbuf / 2;
	if (!have_info) {
		ack = f->seq_from_tap;
		wnd = eff;
	} else {
		uint64_t bytes_acked;
		uint32_t min_rtt, snd_wnd, unacked;
		int immediate;

		memcpy(&bytes_acked, info + 120, 8);
		memcpy(&min_rtt, info + 148, 4);
		memcpy(&snd_wnd, info + 228, 4);
		remote = f->ack_base + (uint32_t)bytes_acked;
		if (seq_lt(f->seq_from_tap, remote))
			remote = f->seq_from_tap;
		if (f->tap_fin_rcvd && (uint32_t)(f->seq_from_tap - remote) <= 1)
			remote = f->seq_from_tap;
		immediate = f->local || sndbuf < SNDBUF_SMALL || (min_rtt > 0 && min_rtt < LOW_RTT_US);
		ack = immediate ? f->seq_from_tap : remote;
		unacked = ack - remote;
		wnd = (snd_wnd < eff ? (int64_t)snd_wnd : eff) - unacked;
		f->poll_fast = unacked > eff / 4;
		if (snd_wnd > f->snd_wnd_max)
			f->snd_wnd_max = snd_wnd;
		f->wnd_short = wnd < GUEST_SEGMENT_MAX &&
			       (unacked > 0 || snd_wnd < f->snd_wnd_max);
	}
	if (seq_lt(ack, f->seq_ack_to_tap))
		ack = f->seq_ack_to_tap;
	if (wnd > MAX_WINDOW)
		wnd = MAX_WINDOW;
	if (wnd < 0)
		wnd = 0;
	wnd >>= f->ws_to_tap & 31;
	*ack_out = ack;
	*wnd_out = (uint16_t)(wnd > 65535 ? 65535 : wnd);
}

/* The last answer again for data frames while nothing came (TcpConn.data_ack_wnd). */
static void dp_data_ack_wnd(struct dp_flow *f, double now, uint32_t *ack, uint16_t *wnd)
{
	if (f->data_ack_valid && f->data_ack_seq == f->seq_from_tap &&
	    f->data_ack_ack == f->seq_ack_to_tap && now - f->data_ack_time < DATA_ACK_TTL) {
		*ack = f->data_ack_ack;
		*wnd = (uint16_t)f->data_ack_wnd;
		return;
	}
	dp_ack_wnd(f, ack, wnd);
	f->data_ack_valid = 1;
	f->data_ack_seq = f->seq_from_tap;
	f->data_ack_ack = *ack;
	f->data_ack_wnd = *wnd;
	f->data_ack_time = now;
}

static void dp_stall(struct dp_flow *f, int stalled, int drained, uint64_t *res)
{
	if (f->stalled != stalled || f->drained != drained) {
		f->stalled = stalled;
		f->drained = drained;
		res[0] |= DP_FILL_EVENTS;
	}
}

/* timers._arm_rto() without restart: the running loop timer's deadline if it fires soon
 * enough, else a new one from Python. */
static void dp_arm_rto(struct dp_flow *f, double now, uint64_t *res)
{
	double when;

	if (f->rto_armed)
		return;
	when = now + f->rto;
	if (f->rto_timer_set && when >= f->rto_when) {
		f->rto_deadline = when;
		f->rto_armed = 1;
		return;
	}
	res[0] |= DP_FILL_ARM_RTO;
}

/* to_guest._from_sock() for a connection in the table, on a vhost-user link whose C fills
 * the guest's buffers (out_vu.py), up to the fill and, when it read data, after it.
 * res[0]: DP_FILL_* followups; res[1]: 1 if vr_rx_fill() ran (rx->out, rx->read say how:
 * the queue's bookkeeping is the caller's), res[2], res[3]: the frame length and the room
 * asked, res[4], res[5]: the ACK number and window the frames carry. Returns DP_FILL_DONE,
 * or DP_FILL_PYTHON to let Python finish (or do all of) it. */
int dp_fill(struct dp_table *t, struct dp_rx *rx, struct dp_flow *f, uint64_t *res)
{
	struct vp_tcp_fill *fill = (struct vp_tcp_fill *)rx->writer_arg;
	struct vp_tcp_read *rd = (struct vp_tcp_read *)rx->reader_arg;
	uint32_t in_flight, seg, count, off, size, frame_len, ack, hdr_len, mss;
	int64_t room, fresh = 0, caps, n;
	uint8_t gso[VNET_HDR_LEN];
	const uint64_t *out = (const uint64_t *)rx->out;
	int known = 0, tso, queued;
	uint16_t wnd;
	double now;

	memset(res, 0, 6 * sizeof(*res));
	if (f->state != (int32_t)t->established || !f->in_table)
		return DP_FILL_PYTHON;
	if (f->discard_due)
		dp_discard(f);
	if (f->fin_sent)
		return DP_FILL_DONE;
	in_flight = f->seq_to_tap - f->seq_ack_from_tap;
	room = (int64_t)f->wnd_from_tap - in_flight;
	if (room <= 0 || !f->mss)
		return DP_FILL_PYTHON;	/* the persist timer's business */
	tso = f->six ? rx->tso6 : rx->tso4;
	mss = f->mss;
	seg = mss;
	if (tso) {
		uint32_t l3 = (f->six ? IP6_HLEN : IP4_HLEN) + TCP_HLEN;
		uint32_t whole = (TSO_MAX_L3 - l3) / mss * mss;

		seg = whole > mss ? whole : mss;
	}
	count = (uint32_t)((room + seg - 1) / seg);
	if (count > SEG_BATCH)
		count = SEG_BATCH;
	if (!f->peek_full && !ioctl(f->fd, FIONREAD, &queued)) {
		known = 1;
		fresh = (int64_t)queued - in_flight;
		if (fresh <= 0 && f->drained && !f->peer_closed)
			return DP_FILL_DONE;	/* an edge comes with new data */
		if ((fresh + seg - 1) / seg < count)
			count = fresh <= 0 ? 1 : (uint32_t)((fresh + seg - 1) / seg);
	}
	off = ETH_HLEN + (f->six ? IP6_HLEN : IP4_HLEN) + TCP_HLEN;
	size = seg;
	if (count == 1 && known && fresh > 0 && fresh < seg)
		size = (uint32_t)fresh + 1;
	if (!f->tmpl_valid || memcmp(f->tmpl_mac, t->guest_mac, 6))
		return DP_FILL_PYTHON;	/* a template for another MAC: TcpConn.template() */
	now = dp_now(t);
	dp_data_ack_wnd(f, now, &ack, &wnd);
	memcpy(fill->tmpl, f->tmpl, sizeof(fill->tmpl));
	fill->six = f->six;
	fill->pseudo = f->pseudo;
	fill->seq = f->seq_to_tap;
	fill->ack = ack;
	fill->wnd = wnd;
	fill->tso_mss = tso ? mss : 0;
	rd->fd = f->fd;
	memset(gso, 0, sizeof(gso));
	hdr_len = off;
	if (tso) {
		gso[0] = 1;	/* NEEDS_CSUM */
		gso[1] = f->six ? GSO_HDR_TCPV6 : GSO_HDR_TCPV4;
		put_le16(gso + 2, (uint16_t)hdr_len);
		put_le16(gso + 4, (uint16_t)mss);
		put_le16(gso + 6, (uint16_t)(off - TCP_HLEN));
		put_le16(gso + 8, 16);	/* the TCP checksum's offset */
	}
	frame_len = off + size;
	res[1] = 1;
	res[2] = frame_len;
	res[3] = (uint64_t)room;
	res[4] = ack;
	res[5] = wnd;
	n = ((vr_rx_fill_fn)rx->fill)((void *)rx->ctx, rx->last_avail & 0xFFFF, rx->indirect,
				      (const void *)rx->regions, rx->nregions,
				      (uint8_t *)rx->used, rx->used_len, rx->rearm, count,
				      VNET_HDR_LEN + frame_len, VNET_HDR_LEN, off, rx->max_views,
				      rx->hint, (uint64_t *)rx->recs, (uint32_t *)rx->chrecs,
				      rx->num, rx->reader, rx->reader_arg, (uint64_t)room,
				      rx->writer, rx->writer_arg, data_valid_hdr,
				      tso ? gso : data_valid_hdr, tso ? hdr_len + mss : 65535 + 14,
				      (uint32_t *)rx->elems, (uint32_t *)rx->spare,
				      (uint64_t *)rx->out);
	rx->read = n;
	/* out[0] the outcome (0: OK), out[5] frames sent, out[11] their payload room */
	if (out[0] != 0 || n <= 0)
		return DP_FILL_PYTHON;	/* no room, the end, an error, a shape for Python */
	caps = (int64_t)out[11];
	f->last_seen = now;
	/* _peeked(): frames not filled mean nothing more to peek until new data (an edge) */
	f->peek_full = n >= caps;
	dp_stall(f, n >= room, !f->peek_full, res);
	if (out[5]) {
		/* _data_sent(): acked_to_tap(), the RTT sample's start (Karn), the RTO */
		f->seq_ack_to_tap = ack;
		f->wnd_to_tap = (uint32_t)wnd << (f->ws_to_tap & 31);
		f->ack_due = 0;
		if (ack != f->seq_from_tap || wnd == 0 || f->wnd_short)
			res[0] |= DP_FILL_ARM_ACK;
		if (!f->rtt_pending && seq_le(f->seq_max, f->seq_to_tap)) {
			f->rtt_pending = 1;
			f->rtt_seq = fill->seq;
			f->rtt_time = now;
		}
		f->seq_to_tap = fill->seq;
		if (seq_lt(f->seq_max, fill->seq))
			f->seq_max = fill->seq;
	}
	dp_arm_rto(f, now, res);
	t->fills++;
	return DP_FILL_DONE;
}
