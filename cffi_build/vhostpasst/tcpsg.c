/* TCP frames to the guest whose payload is scattered over several buffers (vhost-user
 * mergeable RX buffers: Linux posts 1.5-4 KiB buffers, a 64 KiB segment spans ~17), a batch
 * at a time (proto/tcp/out_buf.py and out_vu.py, host -> guest). Same job as tcpseg.c's vp_tcp_frames:
 * headers from a per-connection template written into the frame's first buffer, IPv4 header
 * checksum, and the TCP checksum over the scattered payload unless the guest said it need not
 * be (GUEST_CSUM: the frame is marked DATA_VALID; passt skips it the same way).
 *
 * Frame i is pieces first[i] .. first[i+1] - 1 of (bufs, lens): the headers at the start of
 * the first piece, the payload after them and on through the following pieces, sizes[i]
 * bytes. Without `csum` only the first piece of each frame is touched, so the caller may pass
 * just those. Every access is checked against the lengths given: returns -1 (nothing is
 * promised about frames already written) if a frame's pieces can't hold its headers or, with
 * `csum`, its payload; else the next seq. out_lens[i]: the frame's length. */
#include "tcp_frame.h"

static inline uint32_t swap16(uint32_t s)
{
	return ((s & 0xff) << 8) | (s >> 8);
}

/* The pseudo-header sum over the whole TCP length, folded and not complemented: what a
 * partially checksummed frame (virtio NEEDS_CSUM, Linux CHECKSUM_PARTIAL) carries in its
 * checksum field; whoever segments it adds each segment's header and payload. */
static inline uint16_t partial(uint64_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)sum;
}

/* As vp_tcp_frames_sg, and frames whose payload is longer than `tso_mss` (0: none) are GSO
 * frames the guest segments (virtio GUEST_TSO): their checksum field gets the pseudo-header
 * sum over the full TCP length (virtio 1.2, 5.1.6.4) and their payload is not read. */
int64_t vp_tcp_frames_sg_tso(uint8_t *const *bufs, const uint32_t *lens, unsigned int npieces,
			     const uint32_t *first, const uint32_t *sizes, unsigned int n,
			     const uint8_t *tmpl, int six, uint32_t pseudo, uint32_t seq,
			     uint32_t ack, uint16_t wnd, uint8_t flags, uint8_t last_flags,
			     int csum, uint32_t tso_mss, uint32_t *out_lens)
{
	unsigned int hlen = ETH_HLEN + (six ? IP6_HLEN : IP4_HLEN);
	unsigned int i, p;

	for (i = 0; i < n; i++) {
		unsigned int start = first[i], end = first[i + 1];
		uint8_t *t;
		uint32_t size = sizes[i], l4 = TCP_HLEN + size, left, odd = 0;
		uint64_t sum;

		if (start >= end || end > npieces || lens[start] < hlen + TCP_HLEN)
			return -1;
		if ((six ? l4 : IP4_HLEN + l4) > 0xffff)
			return -1;
		t = write_headers(bufs[start], tmpl, hlen, six, size, seq, ack,
				  i + 1 == n ? last_flags : flags, wnd);
		if (tso_mss && size > tso_mss) {
			put16(t + 16, partial((uint64_t)pseudo + l4));
		} else if (csum) {
			/* header (even length), then the payload piece by piece: a piece that
			 * starts at an odd offset has its bytes in swapped roles */
			sum = (uint64_t)pseudo + l4 + csum_partial(t, TCP_HLEN, 0);
			left = size;
			for (p = start; p < end && left; p++) {
				uint32_t off = p == start ? hlen + TCP_HLEN : 0;
				uint32_t len = lens[p] - off, s;

				if (off > lens[p])
					return -1;
				if (len > left)
					len = left;
				s = csum_partial(bufs[p] + off, len, 0);
				sum += odd ? swap16(s) : s;
				odd ^= len & 1;
				left -= len;
			}
			if (left)
				return -1;
			put16(t + 16, fold(sum));
		}
		out_lens[i] = hlen + l4;
		seq += size;
	}
	return seq;
}

int64_t vp_tcp_frames_sg(uint8_t *const *bufs, const uint32_t *lens, unsigned int npieces,
			 const uint32_t *first, const uint32_t *sizes, unsigned int n,
			 const uint8_t *tmpl, int six, uint32_t pseudo, uint32_t seq,
			 uint32_t ack, uint16_t wnd, uint8_t flags, uint8_t last_flags,
			 int csum, uint32_t *out_lens)
{
	return vp_tcp_frames_sg_tso(bufs, lens, npieces, first, sizes, n, tmpl, six, pseudo,
				    seq, ack, wnd, flags, last_flags, csum, 0, out_lens);
}
