/* Internet checksum (RFC 1071) over a byte buffer, for wire/checksum.py: csum.h's sum.
 * The partial sum is a ones' complement accumulator (folded to 16 bits, which keeps it a
 * valid partial sum); callers chain buffers by passing the previous result as `init`. Odd
 * lengths are padded with a zero byte as the RFC requires. Only `len` bytes from `buf` are
 * read. */
#include "csum.h"

uint32_t vp_csum_partial(const uint8_t *buf, size_t len, uint32_t init)
{
	return csum_partial(buf, len, init);
}

uint16_t vp_csum_fold(uint32_t sum)
{
	return fold(sum);
}
