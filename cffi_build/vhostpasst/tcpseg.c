/* TCP frames to the guest, a batch at a time (vhostpasst/proto/tcp/out_buf.py, host -> guest).
 *
 * The payload of each frame is already in place (peeked from the socket); this fills the
 * Ethernet, IP and TCP headers in front of it from a per-connection template and computes
 * both checksums, so Python makes one call per batch instead of a dozen per segment.
 *
 * tmpl: the frame's headers with everything but the per-segment fields filled in (MACs,
 * ethertype, IP version/TTL/protocol/addresses, ports, data offset); IPv4 total length,
 * IPv4 header checksum, IPv6 payload length, seq, ack, flags, window and TCP checksum are
 * written here. `pseudo` is the partial sum of the pseudo-header's addresses and protocol
 * (the length is added per segment). The last frame gets PSH. Returns the next seq. */
#include "tcp_frame.h"

uint32_t vp_tcp_frames(uint8_t *const *bufs, const uint32_t *sizes, unsigned int n,
		       const uint8_t *tmpl, int six, uint32_t pseudo, uint32_t seq,
		       uint32_t ack, uint16_t wnd, uint8_t flags, uint8_t last_flags,
		       uint32_t *out_lens)
{
	unsigned int hlen = ETH_HLEN + (six ? IP6_HLEN : IP4_HLEN);
	unsigned int i;

	for (i = 0; i < n; i++) {
		uint32_t size = sizes[i];
		uint32_t l4 = TCP_HLEN + size;
		uint8_t *t = write_headers(bufs[i], tmpl, hlen, six, size, seq, ack,
					   i + 1 == n ? last_flags : flags, wnd);

		put16(t + 16, fold(csum_partial(t, l4, (uint64_t)pseudo + l4)));
		out_lens[i] = hlen + l4;
		seq += size;
	}
	return seq;
}
