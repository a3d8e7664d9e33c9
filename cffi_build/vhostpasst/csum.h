/* The one RFC 1071 sum in our C: checksum.c (vhostpasst._csum, wire/checksum.py) and the TCP
 * frame writers (tcp_frame.h) both use it. Header-only (static functions), so each cffi module
 * and fuzz harness that includes it compiles its own copy. */
#ifndef VP_CSUM_H
#define VP_CSUM_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>

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

/* The folded sum, complemented: what goes in a checksum field. */
static inline uint16_t fold(uint64_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

#endif
