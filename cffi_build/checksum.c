/* Internet checksum (RFC 1071) over a byte buffer.
 * The partial sum is a 32-bit ones' complement accumulator; callers chain
 * buffers by passing the previous result as `init`. Odd lengths are padded
 * with a zero byte as the RFC requires. Only `len` bytes from `buf` are read. */
#include <stdint.h>
#include <stddef.h>

static uint32_t fold32(uint64_t sum)
{
	while (sum >> 32)
		sum = (sum & 0xffffffffULL) + (sum >> 32);
	return (uint32_t)sum;
}

uint32_t vp_csum_partial(const uint8_t *buf, size_t len, uint32_t init)
{
	uint64_t sum = init;
	size_t i = 0;

	/* 8 bytes at a time as big-endian 16-bit words summed in 64 bits. */
	for (; i + 8 <= len; i += 8) {
		sum += ((uint32_t)buf[i] << 8 | buf[i + 1]) +
		       ((uint32_t)buf[i + 2] << 8 | buf[i + 3]) +
		       ((uint32_t)buf[i + 4] << 8 | buf[i + 5]) +
		       ((uint32_t)buf[i + 6] << 8 | buf[i + 7]);
	}
	for (; i + 2 <= len; i += 2)
		sum += (uint32_t)buf[i] << 8 | buf[i + 1];
	if (i < len)
		sum += (uint32_t)buf[i] << 8;
	return fold32(sum);
}

uint16_t vp_csum_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}
