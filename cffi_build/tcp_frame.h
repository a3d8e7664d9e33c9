/* What tcpseg.c and tcpsg.c share: header lengths, big-endian stores and the RFC 1071 sum
 * (TCP frames to the guest, cffi_build/tcp*_build.py compile each with this directory on
 * the include path). */
#ifndef VP_TCP_FRAME_H
#define VP_TCP_FRAME_H

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

/* The folded sum, complemented: what goes in a checksum field. */
static inline uint16_t fold(uint64_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

#endif
