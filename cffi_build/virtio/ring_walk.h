/* The split ring's chain walk, shared by every cffi module that pops chains (ring.c: vr_pop();
 * net.c: the TX gather), as static inline functions: each module compiles its own copy of the
 * one walk, with its bounds checks, rather than a copy of the source.
 *
 * Also here: the areas' sizes and the check every index access makes (vr_area_ok()), the
 * per-queue context a pop takes (struct vr_pop_ctx: the ring's areas and the record arrays
 * a pop fills), and the avail_event store a pop that finds the ring dry makes. */
#ifndef VR_RING_WALK_H
#define VR_RING_WALK_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "guest_mem.h"

#define AVAIL_SIZE(num) (6 + 2 * (size_t)(num))
#define USED_SIZE(num) (6 + 8 * (size_t)(num))

static inline int vr_area_ok(const uint8_t *p, size_t len, size_t need, uintptr_t align)
{
	return p && len >= need && ((uintptr_t)p & (align - 1)) == 0;
}

/* Followed by a full fence: the caller re-reads avail idx afterwards, and that load must not
 * pass the store (else a kick could be lost). */
static inline int vr_avail_event_set(uint8_t *used, size_t len, unsigned num, unsigned value)
{
	if (num == 0 || !vr_area_ok(used, len, USED_SIZE(num), 4))
		return -1;
	__atomic_store_n((uint16_t *)(used + 4 + 8 * (size_t)num), (uint16_t)value,
			 __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	return 0;
}

/* --- descriptor chains, one call per batch -------------------------------------------------
 *
 * vr_pop_chains() pops up to `count` chains the way virtio/virtqueue.py's reference walk
 * (_walk_py) does, with the same checks, and describes each buffer as (region index, offset
 * in that region, length) so Python can slice the region's memoryview without a lookup.
 * Descriptors are only read through a bounds-checked index into a table whose length we know
 * (the ring's `desc_len`, or an indirect table proven to lie inside one region), and with
 * memcpy: indirect tables and mappings with an odd mmap offset need not be aligned. */

#define VR_DESC_F_NEXT 1
#define VR_DESC_F_WRITE 2
#define VR_DESC_F_INDIRECT 4
#define VR_MAX_INDIRECT 32768

enum {
	VR_OK = 0,
	VR_E_AVAIL_JUMP,	/* value: how far avail idx moved */
	VR_E_HEAD,		/* value: the head index */
	VR_E_LOOP,		/* value: the head index */
	VR_E_INDIRECT_FEATURE,
	VR_E_INDIRECT_PLACE,	/* nested, chained, or not the head */
	VR_E_INDIRECT_LEN,	/* value: the table length */
	VR_E_INDIRECT_OUTSIDE,	/* value: address, value2: length */
	VR_E_BUF_OUTSIDE,	/* value: address, value2: length */
	VR_E_READ_AFTER_WRITE,
	VR_E_NEXT,		/* value: next index, value2: table length */
	VR_E_ARGS,		/* our bug: areas too small, misaligned, bad sizes */
	VR_FULL,		/* not an error: the buffer array is full; pop again */
};

struct vr_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

static inline void vr_read_desc(const uint8_t *table, unsigned idx, struct vr_desc *d)
{
	const uint8_t *p = table + 16 * (size_t)idx;

	memcpy(&d->addr, p, 8);
	memcpy(&d->len, p + 8, 4);
	memcpy(&d->flags, p + 12, 2);
	memcpy(&d->next, p + 14, 2);
}

/* Returns how many chains were popped (avail entries last_avail .. last_avail + n - 1).
 * Per chain: chains[3i] head, [3i+1] readable count, [3i+2] writable count; its buffers
 * follow the previous chain's in bufs, 3 u64 each (region index, offset, length), readable
 * ones first. status[0] is VR_OK, VR_FULL or the error that stopped at chain n (then
 * status[1], [2] say what was wrong), status[3] the number of buffers written. */
static inline int vr_pop_chains(const uint8_t *desc, size_t desc_len, const uint8_t *avail, size_t avail_len,
		  unsigned num, unsigned last_avail, unsigned count, int indirect,
		  const struct vr_region *regions, unsigned nregions,
		  uint32_t *chains, unsigned chain_cap, uint64_t *bufs, unsigned buf_cap,
		  uint64_t *status)
{
	const uint16_t *ring;
	unsigned pending, c, nbufs = 0, first = 0;

	status[0] = VR_OK;
	status[1] = status[2] = status[3] = 0;
	if (num == 0 || num > 32768 || (num & (num - 1)) || !desc ||
	    desc_len < 16 * (size_t)num || !vr_area_ok(avail, avail_len, AVAIL_SIZE(num), 2) ||
	    (nregions && !regions) || (chain_cap && !chains) || (buf_cap && !bufs)) {
		status[0] = VR_E_ARGS;
		return 0;
	}
	/* Acquire: the heads and descriptors written before idx are visible after this. */
	pending = (__atomic_load_n((const uint16_t *)(avail + 2), __ATOMIC_ACQUIRE) -
		   last_avail) & 0xFFFF;
	if (pending > num) {
		status[0] = VR_E_AVAIL_JUMP;
		status[1] = pending;
		return 0;
	}
	if (count > pending)
		count = pending;
	if (count > chain_cap)
		count = chain_cap;
	ring = (const uint16_t *)(avail + 4);

	for (c = 0; c < count; c++) {
		unsigned head = __atomic_load_n(ring + ((last_avail + c) & (num - 1)),
						__ATOMIC_RELAXED);
		const uint8_t *table = desc;
		unsigned table_len = num, idx = head, steps = 0, nread = 0, nwrite = 0;
		int in_indirect = 0;
		struct vr_desc d;

		first = nbufs;
		if (head >= num) {
			status[0] = VR_E_HEAD;
			status[1] = head;
			goto out;
		}
		for (;;) {
			unsigned ri;
			uint64_t off;

			if (++steps > table_len) {
				status[0] = VR_E_LOOP;
				status[1] = head;
				goto out;
			}
			vr_read_desc(table, idx, &d);	/* idx < table_len: checked below */
			if (d.flags & VR_DESC_F_INDIRECT) {
				if (!indirect) {
					status[0] = VR_E_INDIRECT_FEATURE;
					goto out;
				}
				if (in_indirect || steps != 1 || (d.flags & VR_DESC_F_NEXT)) {
					status[0] = VR_E_INDIRECT_PLACE;
					goto out;
				}
				if (d.len % 16 || d.len / 16 < 1 || d.len / 16 > VR_MAX_INDIRECT) {
					status[0] = VR_E_INDIRECT_LEN;
					status[1] = d.len;
					goto out;
				}
				if (vr_find(regions, nregions, d.addr, d.len, &ri, &off)) {
					status[0] = VR_E_INDIRECT_OUTSIDE;
					status[1] = d.addr;
					status[2] = d.len;
					goto out;
				}
				table = regions[ri].host + off;	/* d.len bytes inside the region */
				table_len = d.len / 16;
				in_indirect = 1;
				idx = 0;
				steps = 0;
				continue;
			}
			if (vr_find(regions, nregions, d.addr, d.len, &ri, &off)) {
				status[0] = VR_E_BUF_OUTSIDE;
				status[1] = d.addr;
				status[2] = d.len;
				goto out;
			}
			if (d.flags & VR_DESC_F_WRITE) {
				nwrite++;
			} else if (nwrite) {
				status[0] = VR_E_READ_AFTER_WRITE;
				goto out;
			} else {
				nread++;
			}
			if (nbufs >= buf_cap) {
				/* This chain does not fit: leave it for the next call. */
				status[0] = VR_FULL;
				goto out;
			}
			bufs[3 * (size_t)nbufs] = ri;
			bufs[3 * (size_t)nbufs + 1] = off;
			bufs[3 * (size_t)nbufs + 2] = d.len;
			nbufs++;
			if (!(d.flags & VR_DESC_F_NEXT))
				break;
			if (d.next >= table_len) {
				status[0] = VR_E_NEXT;
				status[1] = d.next;
				status[2] = table_len;
				goto out;
			}
			idx = d.next;
		}
		chains[3 * (size_t)c] = head;
		chains[3 * (size_t)c + 1] = nread;
		chains[3 * (size_t)c + 2] = nwrite;
	}
out:
	if (status[0] != VR_OK)
		nbufs = first;	/* drop what chain c (failed, or not fitting) had written */
	status[3] = nbufs;
	return (int)c;
}

/* A pop's per-queue arguments in one struct (what Python passes per call is what costs). */
struct vr_pop_ctx {
	const uint8_t *desc;
	size_t desc_len;
	const uint8_t *avail;
	size_t avail_len;
	unsigned num;
	uint32_t *chains;
	unsigned chain_cap;
	uint64_t *bufs;
	unsigned buf_cap;
	uint64_t status[4];
};

#endif
