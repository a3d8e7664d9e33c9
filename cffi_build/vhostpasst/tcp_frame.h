/* What tcpseg.c and tcpsg.c share: header lengths, big-endian stores and the RFC 1071 sum
 * (csum.h) for TCP frames to the guest; cffi_build/vhostpasst/tcp*_build.py compile each with
 * this directory on the include path. */
#ifndef VP_TCP_FRAME_H
#define VP_TCP_FRAME_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "csum.h"

#define ETH_HLEN 14
#define IP4_HLEN 20
#define IP6_HLEN 40
#define TCP_HLEN 20

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

/* The headers of one data frame at `f` from the connection's template `tmpl` (hlen bytes of
 * Ethernet and IP, then TCP): lengths for `size` payload bytes, the IPv4 header checksum,
 * seq, ack, flags and window. The TCP checksum is left to the caller. Returns the TCP
 * header. */
static inline uint8_t *write_headers(uint8_t *f, const uint8_t *tmpl, unsigned int hlen, int six,
				     uint32_t size, uint32_t seq, uint32_t ack, uint8_t flags,
				     uint16_t wnd)
{
	uint8_t *t = f + hlen;
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
	t[13] = flags;
	put16(t + 14, wnd);
	return t;
}

/* tcpsg.c: TCP frames over scattered buffers (the frame writer in tcp_vu.c calls it). */
int64_t vp_tcp_frames_sg_tso(uint8_t *const *bufs, const uint32_t *lens, unsigned int npieces,
			     const uint32_t *first, const uint32_t *sizes, unsigned int n,
			     const uint8_t *tmpl, int six, uint32_t pseudo, uint32_t seq,
			     uint32_t ack, uint16_t wnd, uint8_t flags, uint8_t last_flags,
			     int csum, uint32_t tso_mss, uint32_t *out_lens);

#endif
