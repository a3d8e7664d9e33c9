/* Split-virtqueue index and event accesses that need memory ordering against the driver
 * running on another CPU (virtio 1.2, 2.7). Everything else about the ring is plain memory
 * and stays in Python. Every function takes the ring area's base and length and returns -1
 * instead of touching anything outside it (or misaligned). `num` is the queue size, a power
 * of two checked by the caller; indices are free-running u16 values masked here.
 *
 * avail: flags u16 @0, idx u16 @2, ring[num] u16 @4, used_event u16 @4+2*num
 * used:  flags u16 @0, idx u16 @2, ring[num] {u32 id, u32 len} @4, avail_event u16 @4+8*num
 *
 * Fields are little-endian (VERSION_1); the hosts we run on are little-endian. */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtio ring helpers assume a little-endian host"
#endif

#define AVAIL_SIZE(num) (6 + 2 * (size_t)(num))
#define USED_SIZE(num) (6 + 8 * (size_t)(num))

static int ok(const uint8_t *p, size_t len, size_t need, uintptr_t align)
{
	return p && len >= need && ((uintptr_t)p & (align - 1)) == 0;
}

/* Acquire: the ring entries and descriptors the driver wrote before bumping idx are
 * visible once we have seen the new idx. */
int vr_avail_idx(const uint8_t *avail, size_t len)
{
	if (!ok(avail, len, 4, 2))
		return -1;
	return __atomic_load_n((const uint16_t *)(avail + 2), __ATOMIC_ACQUIRE);
}

int vr_avail_flags(const uint8_t *avail, size_t len)
{
	if (!ok(avail, len, 4, 2))
		return -1;
	return __atomic_load_n((const uint16_t *)avail, __ATOMIC_RELAXED);
}

int vr_avail_head(const uint8_t *avail, size_t len, unsigned num, unsigned idx)
{
	if (num == 0 || !ok(avail, len, AVAIL_SIZE(num), 2))
		return -1;
	return __atomic_load_n((const uint16_t *)(avail + 4) + (idx & (num - 1)),
			       __ATOMIC_RELAXED);
}

/* Read after vr_used_publish()'s full fence, so it is not satisfied before our idx store. */
int vr_used_event(const uint8_t *avail, size_t len, unsigned num)
{
	if (num == 0 || !ok(avail, len, AVAIL_SIZE(num), 2))
		return -1;
	return __atomic_load_n((const uint16_t *)(avail + 4 + 2 * (size_t)num), __ATOMIC_RELAXED);
}

int vr_used_put(uint8_t *used, size_t len, unsigned num, unsigned idx, uint32_t id,
		uint32_t elem_len)
{
	uint32_t *elem;

	if (num == 0 || !ok(used, len, USED_SIZE(num), 4))
		return -1;
	elem = (uint32_t *)(used + 4 + 8 * (size_t)(idx & (num - 1)));
	elem[0] = id;
	elem[1] = elem_len;
	return 0;
}

/* Release: used elements (and the buffer contents we wrote) are visible before the idx.
 * The full fence then orders the store before the caller's reads of used_event / avail
 * flags, or we could miss a driver that just asked to be notified. */
int vr_used_publish(uint8_t *used, size_t len, unsigned idx)
{
	if (!ok(used, len, 4, 4))
		return -1;
	__atomic_store_n((uint16_t *)(used + 2), (uint16_t)idx, __ATOMIC_RELEASE);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	return 0;
}

int vr_used_idx(const uint8_t *used, size_t len)
{
	if (!ok(used, len, 4, 4))
		return -1;
	return __atomic_load_n((const uint16_t *)(used + 2), __ATOMIC_RELAXED);
}

/* Both notification controls are followed by a full fence: the caller re-reads avail idx
 * afterwards, and that load must not pass the store (else a kick could be lost). */
int vr_used_flags_set(uint8_t *used, size_t len, unsigned flags)
{
	if (!ok(used, len, 4, 4))
		return -1;
	__atomic_store_n((uint16_t *)used, (uint16_t)flags, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	return 0;
}

int vr_avail_event_set(uint8_t *used, size_t len, unsigned num, unsigned value)
{
	if (num == 0 || !ok(used, len, USED_SIZE(num), 4))
		return -1;
	__atomic_store_n((uint16_t *)(used + 4 + 8 * (size_t)num), (uint16_t)value,
			 __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	return 0;
}
