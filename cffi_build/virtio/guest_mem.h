/* Guest memory as the vhost-user back end's C sees it: the regions the front end mapped
 * (guest-physical start and size, host address), and the two checks every access to guest
 * memory goes through: vr_find() for a guest-physical range (a descriptor's buffer, an
 * indirect table) and vr_rec_region() for a (region index, offset, length) buffer record
 * vr_pop() wrote earlier (records are host memory; the guest can't change them, but a wrong
 * one must still never reach outside its region). Nothing of guest memory is read here: the
 * callers read each guest value once, into a local, and check that copy.
 *
 * Shared by ring.c and every piece of C that writes or reads guest buffers through records
 * (static inline: each cffi module compiles its own copy). */
#ifndef VR_GUEST_MEM_H
#define VR_GUEST_MEM_H

#include <stdint.h>

struct vr_region {
	uint64_t gpa;
	uint64_t size;
	uint8_t *host;
};


/* The region holding guest-physical [addr, addr + len): the last one starting at or below
 * addr (as the Python index's bisect), and the range must end inside it. The regions are
 * sorted by gpa; if they were not, the answer could be wrong but never outside a region. */
static inline int vr_find(const struct vr_region *regions, unsigned nregions, uint64_t addr,
		   uint64_t len, unsigned *index, uint64_t *offset)
{
	unsigned lo = 0, hi = nregions, mid;
	const struct vr_region *r;

	while (lo < hi) {
		mid = lo + (hi - lo) / 2;
		if (regions[mid].gpa <= addr)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo == 0)
		return -1;
	r = &regions[lo - 1];
	if (!r->host || len > r->size || addr - r->gpa > r->size - len)
		return -1;
	*index = lo - 1;
	*offset = addr - r->gpa;
	return 0;
}

/* The region a (region index, offset, length) buffer record lies in, or NULL if the record
 * reaches outside it (or names no mapped region): the one check every use of a record
 * makes before touching guest memory through it. */
static inline const struct vr_region *vr_rec_region(const struct vr_region *regions,
						    unsigned nregions, const uint64_t *r)
{
	const struct vr_region *reg;

	if (r[0] >= nregions)
		return NULL;
	reg = &regions[r[0]];
	if (!reg->host || r[2] > reg->size || r[1] > reg->size - r[2])
		return NULL;
	return reg;
}

#endif
