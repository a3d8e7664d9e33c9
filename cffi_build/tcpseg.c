/* TCP frames to the guest, a batch at a time (vhostpasst/tcp.py, host -> guest path).
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
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#define ETH_HLEN 14
#define IP4_HLEN 20
#define IP6_HLEN 40
#define TCP_HLEN 20

/* Ones' complement sum of `len` bytes as big-endian 16-bit words, 32 bits at a time into a
 * 64-bit accumulator (RFC 1071 §2: byte order independent, swapped at the end). */
static uint32_t csum_partial(const uint8_t *buf, size_t len, uint64_t sum)
{
	uint64_t acc = 0;
	size_t i = 0;
	uint32_t w;

	for (; i + 4 <= len; i += 4) {
		memcpy(&w, buf + i, 4);
		acc += w;
	}
	if (i + 2 <= len) {
		uint16_t h;
		memcpy(&h, buf + i, 2);
		acc += h;
		i += 2;
	}
	if (i < len) {
		uint16_t h = 0;
		memcpy(&h, buf + i, 1); /* the odd byte, zero padded (first byte in memory) */
		acc += h;
	}
	while (acc >> 16)
		acc = (acc & 0xffff) + (acc >> 16);
	/* native (little-endian on x86/arm64) 16-bit sum -> network order value */
	{
		uint16_t s = (uint16_t)acc;
		const uint8_t *p = (const uint8_t *)&s;
		acc = (uint32_t)p[0] << 8 | p[1];
	}
	sum += acc;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint32_t)sum;
}

static inline void put16(uint8_t *p, uint16_t v)
{
	p[0] = v >> 8;
	p[1] = v & 0xff;
}

static inline void put32(uint8_t *p, uint32_t v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
}

static inline uint16_t fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

uint32_t vp_tcp_frames(uint8_t *const *bufs, const uint32_t *sizes, unsigned int n,
		       const uint8_t *tmpl, int six, uint32_t pseudo, uint32_t seq,
		       uint32_t ack, uint16_t wnd, uint8_t flags, uint8_t last_flags,
		       uint32_t *out_lens)
{
	unsigned int hlen = ETH_HLEN + (six ? IP6_HLEN : IP4_HLEN);
	unsigned int i;

	for (i = 0; i < n; i++) {
		uint8_t *f = bufs[i];
		uint8_t *t = f + hlen;
		uint32_t size = sizes[i];
		uint32_t l4 = TCP_HLEN + size;

		memcpy(f, tmpl, hlen + TCP_HLEN);
		if (six) {
			put16(f + ETH_HLEN + 4, (uint16_t)l4);
		} else {
			put16(f + ETH_HLEN + 2, (uint16_t)(IP4_HLEN + l4));
			put16(f + ETH_HLEN + 10, fold(csum_partial(f + ETH_HLEN, IP4_HLEN, 0)));
		}
		put32(t + 4, seq);
		put32(t + 8, ack);
		t[13] = i + 1 == n ? last_flags : flags;
		put16(t + 14, wnd);
		put16(t + 16, fold(csum_partial(t, l4, (uint64_t)pseudo + l4)));
		out_lens[i] = hlen + l4;
		seq += size;
	}
	return seq;
}
