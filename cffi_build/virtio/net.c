/* virtio-net's guest TX path in C (virtio 1.2, 5.1.6.2): the frames of the chains the driver
 * made available, found where they lie in guest memory, a batch per call.
 *
 * vr_tx_gather() pops chains with the ring's own walk (ring_walk.h, compiled here from the
 * same source as ring.c's vr_pop(), with the same bounds checks), finds each chain's frame
 * (vr_tx_frames()) and, when the ring runs dry, re-arms the driver's kick (EVENT_IDX
 * avail_event) and looks once more: one call where Python made a pop, a frame walk and a
 * re-arm per round. Guest memory is reached only through records the walk checked against
 * their regions, and each guest value (an avail entry, a descriptor) is read once, into a
 * local, by the walk; the frame walk reads only those records, and copies bytes.
 *
 * The ring context (struct vr_pop_ctx) and the region table are virtio/ring.py's (module
 * virtio._ring, whose declarations net_build.py includes): virtio/net.py's TxGather passes
 * them as they are, and tells the VirtQueue what was taken. */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "ring_walk.h"

/* Guest TX frames out of `nchains` chains vr_pop() just popped (`chains`, `bufs` as it wrote
 * them): per chain, the first `hdr` readable bytes are the virtio-net header, copied to
 * hdrs + hdr * i; the rest of its readable bytes is the frame. out[4i .. 4i + 3]: VR_TX_GUEST,
 * region, offset, length when the frame lies in one buffer (used where it is); VR_TX_COPY,
 * 0, offset, length when it spans several and was copied to `bounce` at offset (the one
 * copy a scattered frame costs, without a Python object per piece); VR_TX_SHORT when the
 * chain holds less than a header; VR_TX_BIG when the frame is longer than `max_frame` (no
 * copy: a guest must not make us copy gigabytes, nor stall on a frame no bounce holds).
 * Writable buffers are skipped. Returns how many chains were done: fewer than `nchains` when
 * the next one's frame would not fit what is left of `bounce`; -1 if a record lies outside
 * its region. */
enum { VR_TX_GUEST = 0, VR_TX_COPY, VR_TX_SHORT, VR_TX_BIG, VR_TX_TAKEN };

int vr_tx_frames(const struct vr_region *regions, unsigned nregions, const uint32_t *chains,
		 unsigned nchains, const uint64_t *bufs, unsigned nbufs, unsigned hdr,
		 uint64_t max_frame, uint8_t *hdrs, uint8_t *bounce, size_t bounce_len,
		 uint64_t *out)
{
	unsigned i, k, b = 0, end, fk, pieces;
	uint64_t total, skip, take, fo, frame_len;
	size_t used = 0;
	uint64_t *o;

	for (i = 0; i < nchains; i++, b = end) {
		unsigned nread = chains[3 * (size_t)i + 1], nwrite = chains[3 * (size_t)i + 2];

		if (nread > nbufs - b || nwrite > nbufs - b - nread)
			return -1;
		end = b + nread + nwrite;
		total = 0;
		for (k = b; k < b + nread; k++) {
			const uint64_t *r = bufs + 3 * (size_t)k;

			if (!vr_rec_region(regions, nregions, r))
				return -1;
			total += r[2];
		}
		o = out + 4 * (size_t)i;
		if (total <= hdr) {
			o[0] = VR_TX_SHORT;
			continue;
		}
		frame_len = total - hdr;
		if (frame_len > max_frame) {
			o[0] = VR_TX_BIG;
			continue;
		}
		/* the header (over as many buffers as it takes), and where the frame starts:
		 * buffer fk, fo bytes in */
		skip = hdr;
		fk = b + nread;
		fo = 0;
		for (k = b; k < b + nread; k++) {
			const uint64_t *r = bufs + 3 * (size_t)k;

			take = skip < r[2] ? skip : r[2];
			memcpy(hdrs + (size_t)hdr * i + (hdr - skip), regions[r[0]].host + r[1], take);
			skip -= take;
			if (take < r[2]) {
				fk = k;
				fo = take;
				break;
			}
		}
		pieces = 0;
		for (k = fk; k < b + nread; k++)
			pieces += bufs[3 * (size_t)k + 2] > 0;
		if (pieces == 1) {
			o[0] = VR_TX_GUEST;
			o[1] = bufs[3 * (size_t)fk];
			o[2] = bufs[3 * (size_t)fk + 1] + fo;
			o[3] = frame_len;
			continue;
		}
		if (frame_len > bounce_len - used)
			return (int)i;
		o[0] = VR_TX_COPY;
		o[1] = 0;
		o[2] = used;
		o[3] = frame_len;
		for (k = fk; k < b + nread; k++, fo = 0) {
			const uint64_t *r = bufs + 3 * (size_t)k;

			memcpy(bounce + used, regions[r[0]].host + r[1] + fo, r[2] - fo);
			used += r[2] - fo;
		}
	}
	return (int)i;
}


/* vr_tx_gather() outcomes, res[0] */
enum {
	VR_TXG_DONE = 0,	/* `count` chains taken, or the ring ran dry (the kick re-armed) */
	VR_TXG_ROOM,		/* stopped for room (bounce, records): the ring may hold more */
	VR_TXG_GROW,		/* the next chain has more buffers than ctx->bufs holds: grow it */
	VR_TXG_ERROR,		/* a bad chain or avail index: ctx->status says which */
};

/* Up to `count` chains from avail entry `last_avail` on, popped as vr_pop() does into the
 * context's record arrays (one pop's records after the previous one's), and their frames
 * found by vr_tx_frames() (headers to hdrs, out[] per chain as it says, copies to `bounce`,
 * their offsets from its start). A pop that takes fewer chains than asked is followed by a
 * look at avail idx: with `rearm` (EVENT_IDX, kicks wanted) after a store of avail_event at
 * the next entry, so no kick is lost; a pop that finds the ring empty makes the same store
 * and pops once more. Chains whose frames don't fit what is left of `bounce` are not taken
 * (they stay in the ring). count <= ctx->chain_cap; hdrs holds hdr * count bytes, out
 * 4 * count values.
 *
 * Returns the chains taken (their records first in ctx->chains and ctx->bufs,
 * ctx->status[3] their buffer records), res[0] the outcome (VR_TXG_*); with VR_TXG_ERROR
 * the good chains popped before the bad one (taken, and lost with the queue). -1 if the
 * arguments are wrong (our bug). */
int vr_tx_gather(struct vr_pop_ctx *ctx, unsigned last_avail, unsigned count, int indirect,
		 const struct vr_region *regions, unsigned nregions, uint8_t *used,
		 size_t used_len, int rearm, unsigned hdr, uint64_t max_frame, uint8_t *hdrs,
		 uint8_t *bounce, size_t bounce_len, uint64_t *out, uint32_t *res)
{
	unsigned have = 0, nbufs = 0, asked, n, i, round;
	size_t taken = 0, base;	/* bounce bytes taken, by earlier pops at this one's start */
	int done;

	res[0] = VR_TXG_DONE;
	if (count > ctx->chain_cap)
		return -1;
	while (have < count) {
		asked = count - have;
		for (round = 0; round < 2; round++) {
			n = (unsigned)vr_pop_chains(ctx->desc, ctx->desc_len, ctx->avail,
						    ctx->avail_len, ctx->num,
						    (last_avail + have) & 0xFFFF, asked, indirect,
						    regions, nregions, ctx->chains + 3 * (size_t)have,
						    ctx->chain_cap - have,
						    ctx->bufs + 3 * (size_t)nbufs,
						    ctx->buf_cap - nbufs, ctx->status);
			if (n || ctx->status[0] != VR_OK || !rearm)
				break;
			/* empty: ask for a kick at the next entry, then look again */
			if (vr_avail_event_set(used, used_len, ctx->num,
					       (last_avail + have) & 0xFFFF))
				return -1;
		}
		if (ctx->status[0] == VR_E_ARGS)
			return -1;
		if (ctx->status[0] != VR_OK && ctx->status[0] != VR_FULL) {
			res[0] = VR_TXG_ERROR;
			return (int)(have + n);
		}
		if (ctx->status[0] == VR_FULL && n == 0) {
			res[0] = VR_TXG_GROW;
			break;
		}
		if (n == 0)
			break;	/* the empty pop re-armed the kick */
		done = vr_tx_frames(regions, nregions, ctx->chains + 3 * (size_t)have, n,
				    ctx->bufs + 3 * (size_t)nbufs, (unsigned)ctx->status[3], hdr,
				    max_frame, hdrs + (size_t)hdr * have, bounce + taken,
				    bounce_len - taken, out + 4 * (size_t)have);
		if (done < 0)
			return -1;
		for (i = have, base = taken; i < have + (unsigned)done; i++) {
			uint64_t *o = out + 4 * (size_t)i;

			nbufs += ctx->chains[3 * (size_t)i + 1] + ctx->chains[3 * (size_t)i + 2];
			if (o[0] == VR_TX_COPY) {
				o[2] += base;	/* from this pop's part of bounce on */
				taken += o[3];
			}
		}
		have += (unsigned)done;
		if ((unsigned)done < n) {
			res[0] = VR_TXG_ROOM;	/* the bounce buffer is full */
			break;
		}
		if (n < asked) {
			/* dry, or the records filled: re-arm with one store (not an empty pop)
			 * and look again only if chains came */
			unsigned pending;

			if (rearm && vr_avail_event_set(used, used_len, ctx->num,
							(last_avail + have) & 0xFFFF))
				return -1;
			pending = (__atomic_load_n((const uint16_t *)(ctx->avail + 2),
						   __ATOMIC_ACQUIRE) - last_avail - have) & 0xFFFF;
			if (pending > ctx->num) {
				ctx->status[0] = VR_E_AVAIL_JUMP;
				ctx->status[1] = pending;
				ctx->status[2] = 0;
				res[0] = VR_TXG_ERROR;
				return (int)have;
			}
			if (!pending)
				break;
		}
	}
	ctx->status[3] = nbufs;
	return (int)have;
}

/* --- frames offered to the device's own C ----------------------------------------------
 *
 * vr_tx_offer() hands each frame vr_tx_gather() found (out[] as it wrote them, `n` chains)
 * to a device's consumer, in ring order: the frame's bytes (in guest memory, or in `bounce`
 * for a copied one), its virtio-net header (`hdr` bytes in hdrs) and the offloads the device
 * negotiated (`offloads`: feature bits, HOST_TSO4/6 say which GSO frames the driver may
 * send). A frame the consumer takes (it returns 1) becomes VR_TX_TAKEN: the caller passes it
 * over and only pushes its chain. Then the consumer's `end` runs once (its frames are still
 * valid: the chains are not pushed yet). Guest memory is reached through the record's check
 * (vr_rec_region) and the bounce through its length; the consumer gets only those checked
 * pointers, and must read each guest value once (the guest may rewrite its buffers
 * meanwhile). Returns the frames taken. */
typedef int (*vr_tx_consumer)(void *arg, const uint8_t *frame, uint32_t len,
			      const uint8_t *vnet_hdr, uint64_t offloads);
typedef void (*vr_tx_consumer_end)(void *arg);

int vr_tx_offer(uintptr_t consumer, uintptr_t consumer_end, uintptr_t arg, uint64_t offloads,
		const struct vr_region *regions, unsigned nregions, const uint8_t *hdrs,
		unsigned hdr, const uint8_t *bounce, size_t bounce_len, uint64_t *out,
		unsigned n)
{
	vr_tx_consumer take = (vr_tx_consumer)consumer;
	const struct vr_region *reg;
	const uint8_t *frame;
	unsigned i, taken = 0;
	uint64_t *o;

	if (!take)
		return 0;
	for (i = 0; i < n; i++) {
		o = out + 4 * (size_t)i;
		if (o[3] > UINT32_MAX)
			continue;
		if (o[0] == VR_TX_GUEST) {
			reg = vr_rec_region(regions, nregions, o + 1);
			if (!reg)
				continue;
			frame = reg->host + o[2];
		} else if (o[0] == VR_TX_COPY) {
			if (o[2] > bounce_len || o[3] > bounce_len - o[2])
				continue;
			frame = bounce + o[2];
		} else {
			continue;
		}
		if (take((void *)arg, frame, (uint32_t)o[3], hdrs + (size_t)hdr * i,
			 offloads) == 1) {
			o[0] = VR_TX_TAKEN;
			taken++;
		}
	}
	if (consumer_end)
		((vr_tx_consumer_end)consumer_end)((void *)arg);
	return (int)taken;
}
