/* Split-virtqueue index and event accesses that need memory ordering against the driver
 * running on another CPU (virtio 1.2, 2.7), and the per-chain work a profile showed to be
 * the vhost-user path's main cost in Python: popping descriptor chains and writing used
 * elements, a batch per call. Every function takes the areas' bases and lengths and returns
 * -1 (or an error code) instead of touching anything outside them (or misaligned). `num` is
 * the queue size, a power of two checked by the caller; indices are free-running u16 values
 * masked here.
 *
 * avail: flags u16 @0, idx u16 @2, ring[num] u16 @4, used_event u16 @4+2*num
 * used:  flags u16 @0, idx u16 @2, ring[num] {u32 id, u32 len} @4, avail_event u16 @4+8*num
 *
 * Fields are little-endian (VERSION_1); the hosts we run on are little-endian. */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <sys/uio.h>

#include "ring_walk.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtio ring helpers assume a little-endian host"
#endif

/* Acquire: the ring entries and descriptors the driver wrote before bumping idx are
 * visible once we have seen the new idx. */
int vr_avail_idx(const uint8_t *avail, size_t len)
{
	if (!vr_area_ok(avail, len, 4, 2))
		return -1;
	return __atomic_load_n((const uint16_t *)(avail + 2), __ATOMIC_ACQUIRE);
}

int vr_avail_flags(const uint8_t *avail, size_t len)
{
	if (!vr_area_ok(avail, len, 4, 2))
		return -1;
	return __atomic_load_n((const uint16_t *)avail, __ATOMIC_RELAXED);
}

int vr_avail_head(const uint8_t *avail, size_t len, unsigned num, unsigned idx)
{
	if (num == 0 || !vr_area_ok(avail, len, AVAIL_SIZE(num), 2))
		return -1;
	return __atomic_load_n((const uint16_t *)(avail + 4) + (idx & (num - 1)),
			       __ATOMIC_RELAXED);
}

/* Read after vr_used_publish()'s full fence, so it is not satisfied before our idx store. */
int vr_used_event(const uint8_t *avail, size_t len, unsigned num)
{
	if (num == 0 || !vr_area_ok(avail, len, AVAIL_SIZE(num), 2))
		return -1;
	return __atomic_load_n((const uint16_t *)(avail + 4 + 2 * (size_t)num), __ATOMIC_RELAXED);
}

/* Release: used elements (and the buffer contents we wrote) are visible before the idx.
 * The full fence then orders the store before the caller's reads of used_event / avail
 * flags, or we could miss a driver that just asked to be notified. */
int vr_used_publish(uint8_t *used, size_t len, unsigned idx)
{
	if (!vr_area_ok(used, len, 4, 4))
		return -1;
	__atomic_store_n((uint16_t *)(used + 2), (uint16_t)idx, __ATOMIC_RELEASE);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	return 0;
}

int vr_used_idx(const uint8_t *used, size_t len)
{
	if (!vr_area_ok(used, len, 4, 4))
		return -1;
	return __atomic_load_n((const uint16_t *)(used + 2), __ATOMIC_RELAXED);
}

/* Both notification controls are followed by a full fence: the caller re-reads avail idx
 * afterwards, and that load must not pass the store (else a kick could be lost). The other,
 * vr_avail_event_set(), is in ring_walk.h (a pop that finds the ring dry makes it). */
int vr_used_flags_set(uint8_t *used, size_t len, unsigned flags)
{
	if (!vr_area_ok(used, len, 4, 4))
		return -1;
	__atomic_store_n((uint16_t *)used, (uint16_t)flags, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	return 0;
}

/* --- the dirty log (live migration, VHOST_F_LOG_ALL) -----------------------------------------
 *
 * One bit per 4 KiB page of guest-physical memory, in a bitmap the front end shares with us
 * and maybe with other back ends of the same guest, and clears while we write: hence an
 * atomic OR per byte. Marks the pages of [addr, addr + size); returns 0, or -1 if part of
 * the range lies beyond the log (that part is not marked). */
#define VR_LOG_PAGE 4096

int vr_log_mark(uint8_t *log, size_t log_len, uint64_t addr, uint64_t size)
{
	uint64_t page, last, pages = (uint64_t)log_len * 8;
	int ret = 0;

	if (size == 0)
		return 0;
	if (addr > UINT64_MAX - (size - 1))
		return -1;
	page = addr / VR_LOG_PAGE;
	last = (addr + size - 1) / VR_LOG_PAGE;
	if (last >= pages) {
		if (page >= pages)
			return -1;
		last = pages - 1;
		ret = -1;
	}
	for (; page <= last; page++)
		__atomic_fetch_or(log + page / 8, (uint8_t)(1u << (page % 8)), __ATOMIC_RELAXED);
	return ret;
}

/* n used elements {id, len} (elems[2i], elems[2i+1]) at used idx, idx + 1, ... (masked).
 * Plain stores: vr_used_publish() orders them before the idx the driver reads. */
int vr_used_put_many(uint8_t *used, size_t len, unsigned num, unsigned idx,
		     const uint32_t *elems, unsigned n)
{
	unsigned i;
	uint32_t *ring;

	if (num == 0 || (num & (num - 1)) || !vr_area_ok(used, len, USED_SIZE(num), 4) ||
	    (n && !elems))
		return -1;
	ring = (uint32_t *)(used + 4);
	for (i = 0; i < n; i++) {
		size_t slot = (idx + i) & (num - 1);

		ring[2 * slot] = elems[2 * i];
		ring[2 * slot + 1] = elems[2 * i + 1];
	}
	return 0;
}

/* vr_pop_chains() (ring_walk.h) with the per-queue arguments in one struct (what Python
 * passes per call is what costs). Returns n (chains popped) when status is VR_OK, else
 * -1 - n. */
int vr_pop(struct vr_pop_ctx *ctx, unsigned last_avail, unsigned count, int indirect,
	   const struct vr_region *regions, unsigned nregions)
{
	int n = vr_pop_chains(ctx->desc, ctx->desc_len, ctx->avail, ctx->avail_len, ctx->num,
			      last_avail, count, indirect, regions, nregions, ctx->chains,
			      ctx->chain_cap, ctx->bufs, ctx->buf_cap, ctx->status);

	return ctx->status[0] == VR_OK ? n : -1 - n;
}

/* A frame reader: fills the `niov` iovecs (guest memory, each checked by the caller against
 * its region) from whatever its user reads, e.g. vhostpasst's TCP peeks its socket
 * (cffi_build/vhostpasst/tcp_vu.c). Returns the bytes read (0: no more will come) or -errno.
 * The ring library reads nothing itself: it lays out where the bytes go. */
typedef long (*vr_frame_reader)(void *arg, const struct iovec *iov, unsigned niov);

/* `reader` (a vr_frame_reader, its address as an integer) straight into guest RX buffers:
 * the one read Python's recvmsg_into() would need a memoryview per guest buffer for (17 per
 * 64 KiB frame).
 *
 * Frame i lies over records starts[i] .. starts[i + 1] - 1 (the last frame: .. nrecs - 1) of
 * `recs`, (region index, offset, length) triples as vr_pop() writes them; its bytes start
 * `hdr` bytes into its first buffer (the virtio-net header goes before) and it is
 * `frame_len` bytes long. Its payload is frame bytes `off` .. frame_len - 1, and the payloads
 * of all frames together take at most `room` bytes: caps[i] is what frame i takes (0 past
 * `room`). Every record the read goes through is checked against its region (records of
 * frames past `room`, or after a frame's last byte, are not looked at: nothing goes through
 * them), and the frames must hold what they claim. Returns the bytes read, VR_E_LAYOUT if
 * the layout does not hold, takes more than UIO_MAXIOV pieces or no reader is given
 * (nothing read then), or the reader's -errno. */
#define VR_IOV_MAX 1024
#define VR_E_LAYOUT (-4096)	/* below every -errno */

long vr_read_frames(uintptr_t reader, uintptr_t reader_arg, const struct vr_region *regions,
		    unsigned nregions, const uint64_t *recs, unsigned nrecs,
		    const uint32_t *starts, unsigned nframes, unsigned hdr, unsigned frame_len,
		    unsigned off, uint64_t room, uint32_t *caps)
{
	struct iovec iov[VR_IOV_MAX];
	unsigned niov = 0, i, b, end;

	if (off > frame_len || !reader)
		return VR_E_LAYOUT;
	for (i = 0; i < nframes; i++) {
		uint64_t pos = 0, want, cap = frame_len - off;

		if (cap > room)
			cap = room;
		room -= cap;
		caps[i] = (uint32_t)cap;
		if (cap == 0)
			continue;
		want = off + cap;	/* frame bytes to walk: headers, then the payload */
		end = i + 1 < nframes ? starts[i + 1] : nrecs;
		if (starts[i] >= end || end > nrecs)
			return VR_E_LAYOUT;
		for (b = starts[i]; b < end && pos < want; b++) {
			const uint64_t *r = recs + 3 * (size_t)b;
			uint64_t skip = b == starts[i] ? hdr : 0, len, from, to;
			const struct vr_region *reg;

			reg = vr_rec_region(regions, nregions, r);
			if (!reg || r[2] < skip)
				return VR_E_LAYOUT;
			len = r[2] - skip;	/* frame bytes pos .. pos + len - 1 are here */
			from = pos > off ? pos : off;
			to = pos + len < want ? pos + len : want;
			if (from < to) {
				if (niov == VR_IOV_MAX)
					return VR_E_LAYOUT;
				iov[niov].iov_base = reg->host + r[1] + skip + (from - pos);
				iov[niov].iov_len = to - from;
				niov++;
			}
			pos += len;
		}
		if (pos < want)
			return VR_E_LAYOUT;
	}
	return ((vr_frame_reader)reader)((void *)reader_arg, iov, niov);
}

/* Mergeable RX frames over chains of one writable buffer each (Linux's RX buffers), laid out
 * and committed a batch per call; `recs` are the chains' vr_pop() buffer records (region,
 * offset, length), one per chain, `chains` their chain records (head, readable, writable). */
enum {
	VR_LAYOUT_COUNT = 0,	/* `count` frames laid out */
	VR_LAYOUT_END,		/* the records ended where a frame would start: pop more */
	VR_LAYOUT_SHORT,	/* they ended inside the frame at out[0]: out[3] more chains */
	VR_LAYOUT_ODD,		/* the frame at out[0] has a first buffer too short for headers */
	VR_LAYOUT_VIEWS,	/* `views` reached: by the frame at out[0], or by the last one */
};

/* Frames of `need` bytes (`hdr` of virtio-net header included) from record `from` on, as
 * the Chain-based path groups them: a frame takes its first chain, then ceil(missing / the
 * first's length) chains at a time until they hold `need` (with equal buffers, Linux's: the
 * fewest that do); its first buffer must hold the header and `head` bytes more. At most
 * `count` frames, and `views` chains holding their bytes (the views a read takes). `dry`: the ring had no more to pop, so a frame takes
 * what is left of its last helping. Returns how many frames were laid out (starts[] gets
 * their first records); out[0] is the record after them, out[1] their views, out[2]
 * why it stopped (VR_LAYOUT_*), out[3] with VR_LAYOUT_SHORT how many more chains to pop. */
int vr_rx_layout(const uint64_t *recs, unsigned nrecs, unsigned from, unsigned need,
		 unsigned hdr, unsigned head, unsigned count, unsigned views, int dry,
		 uint32_t *starts, uint32_t *out)
{
	unsigned s = from, n = 0, used = 0, b, j, k, take, status = VR_LAYOUT_COUNT;
	uint64_t room, first, div;

	out[3] = 0;
	while (n < count) {
		if (s >= nrecs) {
			status = VR_LAYOUT_END;
			break;
		}
		first = recs[3 * (size_t)s + 2];
		div = first ? first : 1;	/* a hostile 0-byte buffer */
		room = first;
		b = s + 1;
		while (room < need) {
			k = (unsigned)((need - room + div - 1) / div);
			take = nrecs - b < k ? nrecs - b : k;
			if (take < k && (!dry || take == 0))
				break;
			for (j = 0; j < take; j++)
				room += recs[3 * (size_t)(b + j) + 2];
			b += take;
		}
		if (room < need) {
			status = VR_LAYOUT_SHORT;
			out[3] = b + k - nrecs;
			break;
		}
		if (first <= hdr || first - hdr < head) {
			status = VR_LAYOUT_ODD;	/* checked once the frame is whole, as the Chains */
			break;
		}
		/* the chains holding its bytes (with unequal buffers the last helping may hold
		 * more than the frame needs): the views a read into it takes */
		room = 0;
		for (j = s; room < need; j++)
			room += recs[3 * (size_t)j + 2];
		if (used + (j - s) > views) {
			status = VR_LAYOUT_VIEWS;
			break;
		}
		starts[n++] = s;
		used += j - s;
		s = b;
		if (used >= views) {
			status = VR_LAYOUT_VIEWS;
			break;
		}
	}
	out[0] = s;
	out[1] = used;
	out[2] = status;
	return (int)n;
}

/* vr_rx_gather() results, out[3] */
enum {
	VR_GATHER_OK = 0,	/* frames laid out (maybe none: starved) */
	VR_GATHER_GENERAL,	/* nothing kept: this ring's shape is for the Chain-based path */
	VR_GATHER_ERROR,	/* a bad chain or avail index: ctx->status says which */
};

/* One pop for vr_rx_gather(): up to `want` chains appended to recs/chrecs after the `have`
 * there; how many came, or -1 if one is not a single writable buffer (nothing kept of this
 * pop), or -2 on a ring error (ctx->status; *bad the good chains popped before it). */
static int vr_gather_pop(struct vr_pop_ctx *ctx, unsigned last_avail, int indirect,
			 const struct vr_region *regions, unsigned nregions, uint8_t *used,
			 size_t used_len, int rearm, unsigned want, uint64_t *recs,
			 uint32_t *chrecs, unsigned cap, unsigned have, unsigned *bad)
{
	unsigned c, n, round;

	if (want > ctx->num)
		want = ctx->num;
	if (want > cap - have)
		want = cap - have;
	for (round = 0; round < 2; round++) {
		n = (unsigned)vr_pop_chains(ctx->desc, ctx->desc_len, ctx->avail, ctx->avail_len,
					    ctx->num, (last_avail + have) & 0xFFFF, want, indirect,
					    regions, nregions, chrecs + 3 * (size_t)have, cap - have,
					    recs + 3 * (size_t)have, cap - have, ctx->status);
		if (ctx->status[0] != VR_OK && ctx->status[0] != VR_FULL) {
			*bad = n;
			return -2;
		}
		if (ctx->status[0] == VR_FULL && n == 0)
			return -1;	/* a chain of more buffers than there is room for */
		if (n || !want || !rearm)
			break;
		/* empty: ask for a kick at the next entry, then look again (the fence in
		 * vr_avail_event_set() orders the store before the second read) */
		if (vr_avail_event_set(used, used_len, ctx->num, (last_avail + have) & 0xFFFF)) {
			ctx->status[0] = VR_E_ARGS;
			*bad = 0;
			return -2;
		}
	}
	if (ctx->status[3] != n)
		return -1;
	for (c = 0; c < n; c++) {
		const uint32_t *ch = chrecs + 3 * (size_t)(have + c);

		if (ch[1] != 0 || ch[2] != 1)
			return -1;
	}
	return (int)n;
}

/* net.rx_frames()'s pops and layout in one call: up to `count` mergeable RX frames of `need`
 * bytes (header included) over chains of one writable buffer each, grouped by
 * vr_rx_layout(), at most `max_views` chains holding their bytes. The chains are popped from
 * avail entry `last_avail` on, `hint` (the buffer size seen last) sizing the first pop; their
 * records go to recs (region, offset, length) and chrecs (head, readable, writable), at most
 * `cap` (>= num) of each. A pop that finds the ring dry re-arms the kick (`rearm`: EVENT_IDX
 * and kicks wanted) with one store in the used ring and looks again.
 *
 * Returns the frames laid out (starts[] their first records) and out[0] the chains kept (the
 * frames'; the rest popped are given back: not counted), out[1] the chains popped in all
 * (the ring's whole content when starved), out[2] 1 if the ring ran dry before `count`
 * frames (the kick is re-armed), out[3] VR_GATHER_*: with VR_GATHER_GENERAL nothing is kept
 * (a chain of another shape, a first frame the layout refuses, a ring smaller than one
 * frame); with VR_GATHER_ERROR ctx->status says what was wrong (out[1]: the good chains
 * popped before it) and the return value is -1. */
int vr_rx_gather(struct vr_pop_ctx *ctx, unsigned last_avail, int indirect,
		 const struct vr_region *regions, unsigned nregions, uint8_t *used,
		 size_t used_len, int rearm, unsigned count, unsigned need, unsigned hdr,
		 unsigned head, unsigned max_views, unsigned hint, uint64_t *recs,
		 uint32_t *chrecs, unsigned cap, uint32_t *starts, uint32_t *out)
{
	unsigned nheads = 0, i = 0, nstarts = 0, nviews = 0, want, bad = 0, lo[4];
	int starved = 0, general = 0;
	uint64_t per;

	out[0] = out[1] = out[2] = out[3] = 0;
	if (!ctx->num || cap < ctx->num || !need) {
		ctx->status[0] = VR_E_ARGS;
		out[3] = VR_GATHER_ERROR;
		return -1;
	}
	per = hint ? (need + (uint64_t)hint - 1) / hint : 1;
	want = per * count < ctx->num ? (unsigned)(per * count) : ctx->num;
	while (nstarts < count) {
		int got = vr_gather_pop(ctx, last_avail, indirect, regions, nregions, used,
					used_len, rearm, want, recs, chrecs, cap, nheads, &bad);
		unsigned why, n;
		int dry;

		if (got == -2) {
			out[1] = nheads + bad;
			out[3] = VR_GATHER_ERROR;
			return -1;
		}
		if (got == -1) {	/* an irregular chain: the frames so far, or the Chains */
			general = nstarts == 0;
			break;
		}
		nheads += (unsigned)got;
		if (got == 0 && i == nheads) {
			starved = 1;	/* the empty pop re-armed the kick */
			break;
		}
		dry = (unsigned)got < want;
		n = (unsigned)vr_rx_layout(recs, nheads, i, need, hdr, head, count - nstarts,
					   max_views - nviews, dry, starts + nstarts, lo);
		nstarts += n;
		i = lo[0];
		nviews += lo[1];
		why = lo[2];
		if ((why == VR_LAYOUT_END || why == VR_LAYOUT_SHORT) && dry) {
			/* the pop found the ring dry: re-arm the kick with one store (not the
			 * empty pop that would do it) and look again only if chains came */
			unsigned pending;

			if (rearm && vr_avail_event_set(used, used_len, ctx->num,
							(last_avail + nheads) & 0xFFFF)) {
				ctx->status[0] = VR_E_ARGS;
				out[1] = nheads;
				out[3] = VR_GATHER_ERROR;
				return -1;
			}
			pending = (__atomic_load_n((const uint16_t *)(ctx->avail + 2),
						   __ATOMIC_ACQUIRE) - last_avail - nheads) & 0xFFFF;
			if (pending > ctx->num) {
				ctx->status[0] = VR_E_AVAIL_JUMP;
				ctx->status[1] = pending;
				out[1] = nheads;
				out[3] = VR_GATHER_ERROR;
				return -1;
			}
			if (!pending) {
				starved = 1;
				general = why == VR_LAYOUT_SHORT && !nstarts &&
					  ctx->num <= nheads - i;
				break;
			}
		}
		if (why == VR_LAYOUT_END) {
			uint64_t last = recs[3 * (size_t)(nheads - 1) + 2];

			per = (need + (last ? last : 1) - 1) / (last ? last : 1);
			want = per * (count - nstarts) < ctx->num ?
			       (unsigned)(per * (count - nstarts)) : ctx->num;
		} else if (why == VR_LAYOUT_SHORT && got) {
			want = lo[3];	/* more chains, or the empty pop that re-arms the kick */
		} else if (why == VR_LAYOUT_SHORT) {	/* the ring ran dry inside the frame */
			starved = 1;
			general = !nstarts && ctx->num <= nheads - i;
			break;
		} else {	/* COUNT, VIEWS or ODD */
			general = !nstarts;
			break;
		}
	}
	out[1] = nheads;
	out[2] = (unsigned)starved;
	if (general) {
		out[3] = VR_GATHER_GENERAL;
		return 0;
	}
	out[0] = i;
	return (int)nstarts;
}

/* Headers and used elements for frames vr_rx_layout() laid out and the caller filled: frame i
 * (records starts[i] .. starts[i + 1] - 1, the last one .. nrecs - 1) is lengths[i] frame
 * bytes long, 0 for a frame not sent (i >= nlengths too). Its 12-byte header goes at the
 * start of its first buffer: `plain`, or `gso` when lengths[i] > gso_from, num_buffers (bytes
 * 10-11) set here. elems gets (head, bytes used) for every chain a frame uses, in order, then
 * (head, 0) for the chains popped and not used that come before the last used one; the
 * return value is the number of those pairs, *tail the unused chains after the last used one
 * (to rewind). counters: frames committed, of those over several chains, of those GSO.
 * -1 if a frame can't hold its length or a record is outside its region (nothing written). */
int vr_rx_commit(const struct vr_region *regions, unsigned nregions, const uint64_t *recs,
		 const uint32_t *chains, unsigned nrecs, const uint32_t *starts,
		 unsigned nframes, const uint32_t *lengths, unsigned nlengths,
		 const uint8_t *plain, const uint8_t *gso, uint32_t gso_from, unsigned hdr,
		 uint32_t *elems, uint32_t *spare, uint32_t *tail, uint32_t *counters)
{
	unsigned i, b, end, n = 0, nspare = 0, after = 0, pass;

	if (hdr != 12 || nlengths > nframes)
		return -1;
	counters[0] = counters[1] = counters[2] = 0;
	/* pass 0 checks everything, pass 1 writes: a bad frame leaves nothing half written */
	for (pass = 0; pass < 2; pass++) {
		for (i = 0; i < nframes; i++) {
			uint64_t total, room = 0;
			unsigned used = 0;

			end = i + 1 < nframes ? starts[i + 1] : nrecs;
			if (starts[i] >= end || end > nrecs)
				return -1;
			total = i < nlengths && lengths[i] ? (uint64_t)hdr + lengths[i] : 0;
			for (b = starts[i]; b < end && room < total; b++) {
				const uint64_t *r = recs + 3 * (size_t)b;
				const struct vr_region *reg;
				uint64_t take;

				reg = vr_rec_region(regions, nregions, r);
				if (!reg)
					return -1;
				if (b == starts[i] && r[2] < hdr)
					return -1;
				take = total - room < r[2] ? total - room : r[2];
				room += take;
				used++;
				if (pass) {
					elems[2 * n] = chains[3 * (size_t)b];
					elems[2 * n + 1] = (uint32_t)take;
					n++;
				}
			}
			if (room < total)
				return -1;
			if (!pass)
				continue;
			if (used) {
				const uint64_t *r = recs + 3 * (size_t)starts[i];
				uint8_t *h = regions[r[0]].host + r[1];
				int big = lengths[i] > gso_from;
				uint16_t nb = (uint16_t)used;

				memcpy(h, big ? gso : plain, 10);
				memcpy(h + 10, &nb, 2);
				counters[0]++;
				counters[1] += used > 1;
				counters[2] += big;
				after = 0;
			}
			for (b = starts[i] + used; b < end; b++) {
				spare[nspare++] = chains[3 * (size_t)b];
				after++;
			}
		}
	}
	/* the unused chains before the last used one go back empty, after the frames' */
	for (i = 0; i + after < nspare; i++) {
		elems[2 * n] = spare[i];
		elems[2 * n + 1] = 0;
		n++;
	}
	*tail = after;
	return (int)n;
}

/* The lean RX path in one call, for a caller that writes only the frames' headers after the
 * read (vhostpasst's TCP with GUEST_CSUM): vr_rx_gather(), vr_read_frames() into the frames
 * with `reader`, `writer` for their headers, vr_rx_commit(). A Python round between the steps
 * cost more than the steps. The ring library knows nothing of what the frames carry nor where
 * their bytes come from: `reader` (see vr_read_frames()) fills them, and `writer` (a
 * vr_frame_writer, its address as an integer) gets each frame's first buffer from the frame's
 * first byte on (past the virtio-net header), that buffer's length and the frame's payload
 * size, and sets each frame's length; it returns >= 0, or < 0 if it can't.
 * Both get only pointers from records checked against their regions here.
 *
 * Arguments as for those calls; at most VR_FILL_MAX frames. out[0] says how it went
 * (VR_FILL_*); out[1] the chains kept (popped and not given back: the caller moves its
 * last_avail on by them, and with anything but VR_FILL_OK gives them all back), out[2]
 * the chains popped in all, out[3] 1 if the ring ran dry (kick re-armed), out[4] frames laid
 * out, out[5] frames sent, out[6] (head, length) pairs in elems to push, out[7] chains to
 * give back after them, out[8..10] vr_rx_commit()'s counters, out[11] the payload room of
 * all frames laid out, out[12] the first frame's first buffer length (the ring's buffer size,
 * as a hint for the next call). Returns the bytes read (0: the end of the data, nothing sent),
 * the reader's -errno with VR_FILL_READ. */
#define VR_FILL_MAX 256
enum {
	VR_FILL_OK = 0,		/* out[5] frames sent (0 with 0 bytes: end of stream) */
	VR_FILL_EMPTY,		/* no frame laid out: the ring is short (see out[3]) */
	VR_FILL_GENERAL,	/* nothing kept: a ring shape for the Chain-based path */
	VR_FILL_ERROR,		/* a bad chain or avail index: ctx->status says which */
	VR_FILL_READ,		/* the reader failed: -errno returned */
	VR_FILL_LAYOUT,		/* the records don't hold the frames, or no reader: nothing read */
	VR_FILL_WRITER,		/* the writer refused the frames: read, nothing committed */
	VR_FILL_COMMIT,		/* the frames can't hold their lengths: nothing committed */
};

typedef int64_t (*vr_frame_writer)(void *arg, uint8_t *const *firsts,
				   const uint32_t *first_lens, const uint32_t *sizes,
				   unsigned n, uint32_t *lens);

long vr_rx_fill(struct vr_pop_ctx *ctx, unsigned last_avail, int indirect,
		const struct vr_region *regions, unsigned nregions, uint8_t *used,
		size_t used_len, int rearm, unsigned count, unsigned need, unsigned hdr,
		unsigned head, unsigned max_views, unsigned hint, uint64_t *recs,
		uint32_t *chrecs, unsigned cap, uintptr_t reader, uintptr_t reader_arg,
		uint64_t room, uintptr_t writer, uintptr_t writer_arg, const uint8_t *plain,
		const uint8_t *gso, uint32_t gso_from, uint32_t *elems, uint32_t *spare,
		uint64_t *out)
{
	uint32_t starts[VR_FILL_MAX], caps[VR_FILL_MAX], sizes[VR_FILL_MAX];
	uint32_t first_lens[VR_FILL_MAX], lens[VR_FILL_MAX], gout[4], tail, counters[3];
	uint8_t *firsts[VR_FILL_MAX];
	unsigned i, nf, sent = 0;
	uint64_t left, capsum = 0;
	long n;
	int got, pairs;

	memset(out, 0, 13 * sizeof(*out));
	if (count > VR_FILL_MAX)
		count = VR_FILL_MAX;
	if (need < hdr || !reader || !writer) {
		out[0] = VR_FILL_LAYOUT;
		return 0;
	}
	got = vr_rx_gather(ctx, last_avail, indirect, regions, nregions, used, used_len, rearm,
			   count, need, hdr, head, max_views, hint, recs, chrecs, cap, starts, gout);
	out[1] = gout[0];
	out[2] = gout[1];
	out[3] = gout[2];
	if (gout[3] == VR_GATHER_ERROR) {
		out[0] = VR_FILL_ERROR;
		return 0;
	}
	if (gout[3] == VR_GATHER_GENERAL) {
		out[0] = VR_FILL_GENERAL;
		return 0;
	}
	nf = (unsigned)got;	/* >= 0 unless VR_GATHER_ERROR */
	out[4] = nf;
	if (!nf) {
		out[0] = VR_FILL_EMPTY;
		return 0;
	}
	out[12] = recs[2];
	n = vr_read_frames(reader, reader_arg, regions, nregions, recs, gout[0], starts, nf, hdr,
			   need - hdr, head, room, caps);
	if (n == VR_E_LAYOUT) {
		out[0] = VR_FILL_LAYOUT;
		return 0;
	}
	if (n < 0) {
		out[0] = VR_FILL_READ;
		return n;
	}
	for (i = 0; i < nf; i++)
		capsum += caps[i];
	out[11] = capsum;
	if (n == 0)
		return 0;	/* end of stream: VR_FILL_OK, nothing sent */
	for (left = (uint64_t)n, i = 0; i < nf && left; i++) {
		const uint64_t *r = recs + 3 * (size_t)starts[i];
		const struct vr_region *reg = vr_rec_region(regions, nregions, r);

		if (!reg || r[2] < hdr) {	/* vr_read_frames() checked: cannot happen */
			out[0] = VR_FILL_LAYOUT;
			return n;
		}
		firsts[i] = reg->host + r[1] + hdr;
		first_lens[i] = (uint32_t)(r[2] - hdr);
		sizes[i] = caps[i] < left ? caps[i] : (uint32_t)left;
		left -= sizes[i];
		sent++;
	}
	if (((vr_frame_writer)writer)((void *)writer_arg, firsts, first_lens, sizes, sent,
				      lens) < 0) {
		out[0] = VR_FILL_WRITER;
		return n;
	}
	pairs = vr_rx_commit(regions, nregions, recs, chrecs, gout[0], starts, nf, lens, sent,
			     plain, gso, gso_from, hdr, elems, spare, &tail, counters);
	if (pairs < 0) {
		out[0] = VR_FILL_COMMIT;
		return n;
	}
	out[5] = sent;
	out[6] = (uint64_t)pairs;
	out[7] = tail;
	out[8] = counters[0];
	out[9] = counters[1];
	out[10] = counters[2];
	return n;
}
