/* libFuzzer harness for cffi_build/virtio/ring.c and net.c, the split-virtqueue C that reads
 * guest memory: chain pops (descriptor tables, indirect tables: ring_walk.h), TX frame
 * extraction and the one-call TX gather (net.c), mergeable RX gather,
 * layout, read and commit (vr_rx_fill() with tcp_vu.c's socket reader and frame writer),
 * used-ring stores and
 * the dirty log.
 *
 * Guest memory: 1-3 regions, each its own heap allocation of exactly the region's size (so
 * ASan's redzones sit at every region edge), at input-chosen guest-physical addresses and
 * host misalignments, filled from the input. The rings (descriptor table, avail, used) lie in
 * region 0 at input-chosen offsets, as a hostile front end may place them: overlapping each
 * other and the buffers. Ring areas are passed with the lengths Python would pass (clipped at
 * the region's end, which the C must refuse). While each call runs, the racer (fuzz_common.h)
 * rewrites the regions with random bytes.
 *
 * Beyond what ASan/UBSan catch, the harness checks what Python relies on: every buffer record
 * (region, offset, length) lies inside its region, counts agree, TX frames lie inside the
 * region or the bounce buffer, heads are < num. Input layout: see the take() calls in order. */
#include "ring.c"
#include "net.c"
#include "tcpsg.c"
#include "tcp_vu.c"

#include <fcntl.h>
#include <unistd.h>

#include "fuzz_common.h"

#define MAX_REGIONS 3
#define MAX_REGION_SIZE 16384
#define HDR 12

struct guest {
	struct vr_region r[MAX_REGIONS];
	uint8_t *alloc[MAX_REGIONS];
	unsigned n;
	struct racer_area areas[MAX_REGIONS];
};

static int sock[2] = { -1, -1 };	/* a stream socketpair for the RX reads */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	racer_init();
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sock)) {
		perror("socketpair");
		abort();
	}
	return 0;
}

static void guest_map(struct guest *g, struct in *in)
{
	unsigned i, j;

	g->n = 1 + take(in, 1) % MAX_REGIONS;
	for (i = 0; i < g->n; i++) {
		uint64_t mode = take(in, 1), size = 1 + take(in, 2) % MAX_REGION_SIZE;
		unsigned mis = mode >> 5;	/* host misalignment 0..7: odd mmap offsets */
		uint64_t gpa = mode & 1 ? take(in, 8) : take(in, 2) << 12;

		g->alloc[i] = malloc(size + mis);
		g->r[i].gpa = gpa;
		g->r[i].size = size;
		g->r[i].host = g->alloc[i] + mis;
	}
	/* sorted by gpa, as RegionTable does (insertion sort, n <= 3) */
	for (i = 1; i < g->n; i++)
		for (j = i; j > 0 && g->r[j - 1].gpa > g->r[j].gpa; j--) {
			struct vr_region t = g->r[j];
			uint8_t *a = g->alloc[j];

			g->r[j] = g->r[j - 1];
			g->r[j - 1] = t;
			g->alloc[j] = g->alloc[j - 1];
			g->alloc[j - 1] = a;
		}
	for (i = 0; i < g->n; i++) {
		g->areas[i].p = g->r[i].host;
		g->areas[i].len = g->r[i].size;
	}
}

static void guest_fill(struct guest *g, struct in *in)
{
	unsigned i;

	for (i = 0; i < g->n; i++)
		take_fill(in, g->r[i].host, g->r[i].size);
}

static void guest_unmap(struct guest *g)
{
	unsigned i;

	for (i = 0; i < g->n; i++)
		free(g->alloc[i]);
}

/* A descriptor table the walk gets far with: addresses inside a region, `next` mostly
 * inside the table; flags, lengths and the rest as the input had them. */
static void shape_descs(const struct guest *g, uint8_t *table, size_t len)
{
	size_t i;

	for (i = 0; i + 16 <= len; i += 16) {
		uint8_t *d = table + i;
		const struct vr_region *r = &g->r[d[2] % g->n];
		uint64_t addr = r->gpa + (d[0] | d[1] << 8) % r->size;
		uint32_t l = (d[8] | d[9] << 8) & 0x1fff;

		memcpy(d, &addr, 8);
		memcpy(d + 8, &l, 4);
	}
}

struct rings {
	const uint8_t *desc, *avail;
	uint8_t *used;
	size_t desc_len, avail_len, used_len;
};

/* Linux's RX ring: every descriptor one writable buffer, the avail ring holding heads < num
 * from `last` on (with `some`, fewer than all), so the gather gets past its first pop. */
static void shape_rx(const struct rings *rg, unsigned num, unsigned last, int some)
{
	uint8_t *desc = (uint8_t *)rg->desc, *avail = (uint8_t *)rg->avail;
	uint16_t flags = VR_DESC_F_WRITE, idx, head;
	size_t i;

	for (i = 0; i + 16 <= rg->desc_len; i += 16)
		memcpy(desc + i + 12, &flags, 2);
	if (rg->avail_len < AVAIL_SIZE(num))
		return;
	idx = (uint16_t)(last + (some ? avail[4] % num : num));
	memcpy(avail + 2, &idx, 2);
	for (i = 0; i < num; i++) {
		memcpy(&head, avail + 4 + 2 * i, 2);
		head %= num;
		memcpy(avail + 4 + 2 * i, &head, 2);
	}
}

/* What pop gave Python: every record inside its region, counts that add up. */
static void check_pop(const struct guest *g, const struct vr_pop_ctx *ctx, int ret,
		      unsigned count)
{
	unsigned n = ret >= 0 ? (unsigned)ret : (unsigned)(-1 - ret), c, total = 0, b;

	CHECK(n <= count && n <= ctx->chain_cap);
	CHECK(ctx->status[3] <= ctx->buf_cap);
	for (c = 0; c < n; c++) {
		CHECK(ctx->chains[3 * c] < ctx->num);
		total += ctx->chains[3 * c + 1] + ctx->chains[3 * c + 2];
	}
	CHECK(total == ctx->status[3]);
	for (b = 0; b < ctx->status[3]; b++) {
		const uint64_t *r = ctx->bufs + 3 * (size_t)b;

		CHECK(r[0] < g->n);
		CHECK(r[2] <= g->r[r[0]].size && r[1] <= g->r[r[0]].size - r[2]);
	}
}

/* The three ring areas in region 0 at input-chosen offsets, `num` entries. */
static void place_rings(struct guest *g, struct in *in, unsigned num, struct rings *rg)
{
	uint64_t size = g->r[0].size;
	uint64_t od = take(in, 2) % size, oa = take(in, 2) % size, ou = take(in, 2) % size;
	size_t want_d = 16 * (size_t)num, want_a = AVAIL_SIZE(num), want_u = USED_SIZE(num);

	rg->desc = g->r[0].host + od;
	rg->desc_len = size - od < want_d ? size - od : want_d;
	rg->avail = g->r[0].host + oa;
	rg->avail_len = size - oa < want_a ? size - oa : want_a;
	rg->used = g->r[0].host + ou;
	rg->used_len = size - ou < want_u ? size - ou : want_u;
}

static void ctx_init(struct vr_pop_ctx *ctx, const struct rings *rg, unsigned num,
		     unsigned buf_cap)
{
	memset(ctx, 0, sizeof(*ctx));
	ctx->desc = rg->desc;
	ctx->desc_len = rg->desc_len;
	ctx->avail = rg->avail;
	ctx->avail_len = rg->avail_len;
	ctx->num = num;
	ctx->chain_cap = num;
	ctx->chains = calloc(3 * (size_t)num + 1, sizeof(uint32_t));
	ctx->buf_cap = buf_cap;
	ctx->bufs = calloc(3 * (size_t)buf_cap + 1, sizeof(uint64_t));
}

static void ctx_free(struct vr_pop_ctx *ctx)
{
	free(ctx->chains);
	free(ctx->bufs);
}

/* TX: pop, then vr_tx_frames() over what was popped, as virtio/net.py does. */
static void op_tx(struct guest *g, struct in *in, unsigned num, int race, uint64_t seed)
{
	unsigned last = take(in, 2), count = take(in, 2) % (num + 2), indirect = take(in, 1) & 1;
	unsigned buf_cap = 1 + take(in, 2) % 2048, hdr = take(in, 1) % 24, n, i;
	uint64_t max_frame = take(in, 2), bounce_len = take(in, 2);
	uint8_t *bounce, *hdrs;
	uint64_t *out;
	struct vr_pop_ctx ctx;
	struct rings rg;
	int ret, done;

	place_rings(g, in, num, &rg);
	ctx_init(&ctx, &rg, num, buf_cap);
	guest_fill(g, in);
	if (take(in, 1) & 1)
		shape_descs(g, (uint8_t *)rg.desc, rg.desc_len);
	bounce = malloc(bounce_len + 1);
	hdrs = malloc((size_t)hdr * num + 1);
	out = malloc(4 * sizeof(uint64_t) * num + 1);

	if (race)
		racer_start(g->areas, g->n, seed);
	ret = vr_pop(&ctx, last, count, indirect, g->r, g->n);
	n = ret >= 0 ? (unsigned)ret : (unsigned)(-1 - ret);
	done = vr_tx_frames(g->r, g->n, ctx.chains, n, ctx.bufs, ctx.status[3], hdr, max_frame,
			    hdrs, bounce, bounce_len, out);
	if (race)
		racer_stop();

	check_pop(g, &ctx, ret, count);
	CHECK(done >= 0 && (unsigned)done <= n);	/* records from a pop are never refused */
	for (i = 0; i < (unsigned)done; i++) {
		const uint64_t *o = out + 4 * (size_t)i;

		if (o[0] == VR_TX_GUEST) {
			CHECK(o[1] < g->n);
			CHECK(o[3] <= g->r[o[1]].size && o[2] <= g->r[o[1]].size - o[3]);
			CHECK(o[3] <= max_frame);
		} else if (o[0] == VR_TX_COPY) {
			CHECK(o[3] <= bounce_len && o[2] <= bounce_len - o[3]);
			CHECK(o[3] <= max_frame);
		} else {
			CHECK(o[0] == VR_TX_SHORT || o[0] == VR_TX_BIG);
		}
	}
	free(bounce);
	free(hdrs);
	free(out);
	ctx_free(&ctx);
}

/* TX in one call: vr_tx_gather() (pops, frames, re-arms), as virtio/net.py's TxGather calls
 * it, with records the size of the input's choosing (so pops stop for room mid-batch). */
static void op_tx_gather(struct guest *g, struct in *in, unsigned num, int race, uint64_t seed)
{
	unsigned last = take(in, 2), count = take(in, 2) % (num + 2), indirect = take(in, 1) & 1;
	unsigned buf_cap = 1 + take(in, 2) % 2048, hdr = take(in, 1) % 24, i, total = 0;
	uint64_t max_frame = take(in, 2), bounce_len = take(in, 2), copied = 0;
	int rearm = take(in, 1) & 1, ret;
	uint8_t *bounce, *hdrs;
	uint64_t *out;
	uint32_t res[1];
	struct vr_pop_ctx ctx;
	struct rings rg;

	place_rings(g, in, num, &rg);
	ctx_init(&ctx, &rg, num, buf_cap);
	guest_fill(g, in);
	if (take(in, 1) & 1)
		shape_descs(g, (uint8_t *)rg.desc, rg.desc_len);
	bounce = malloc(bounce_len + 1);
	hdrs = malloc((size_t)hdr * num + 1);
	out = malloc(4 * sizeof(uint64_t) * num + 1);

	if (race)
		racer_start(g->areas, g->n, seed);
	ret = vr_tx_gather(&ctx, last, count, indirect, g->r, g->n, rg.used, rg.used_len, rearm,
			   hdr, max_frame, hdrs, bounce, bounce_len, out, res);
	if (race)
		racer_stop();

	CHECK(ret >= -1 && (ret < 0 || (unsigned)ret <= count));
	CHECK(count <= num || ret == -1);
	CHECK(res[0] <= VR_TXG_ERROR);
	if (ret > 0 && res[0] != VR_TXG_ERROR) {
		for (i = 0; i < (unsigned)ret; i++) {
			const uint64_t *o = out + 4 * (size_t)i;

			CHECK(ctx.chains[3 * i] < num);
			total += ctx.chains[3 * i + 1] + ctx.chains[3 * i + 2];
			if (o[0] == VR_TX_GUEST) {
				CHECK(o[1] < g->n);
				CHECK(o[3] <= g->r[o[1]].size && o[2] <= g->r[o[1]].size - o[3]);
				CHECK(o[3] <= max_frame);
			} else if (o[0] == VR_TX_COPY) {
				/* copies follow each other in bounce, over all the pops */
				CHECK(o[2] == copied && o[3] <= bounce_len - copied);
				CHECK(o[3] <= max_frame);
				copied += o[3];
			} else {
				CHECK(o[0] == VR_TX_SHORT || o[0] == VR_TX_BIG);
			}
		}
		CHECK(total == ctx.status[3] && total <= buf_cap);
		for (i = 0; i < total; i++) {
			const uint64_t *r = ctx.bufs + 3 * (size_t)i;

			CHECK(r[0] < g->n);
			CHECK(r[2] <= g->r[r[0]].size && r[1] <= g->r[r[0]].size - r[2]);
		}
	}
	free(bounce);
	free(hdrs);
	free(out);
	ctx_free(&ctx);
}

static void drain(void)
{
	uint8_t buf[4096];
	unsigned i;

	for (i = 0; i < 64 && recv(sock[0], buf, sizeof(buf), MSG_DONTWAIT) > 0; i++)
		;
}

/* RX: vr_rx_fill() (gather, recvmsg into the frames, tcpsg.c's writer, commit), or
 * vr_rx_gather() then vr_rx_commit() with lengths from the input. */
static void op_rx(struct guest *g, struct in *in, unsigned num, int race, uint64_t seed)
{
	unsigned last = take(in, 2), indirect = take(in, 1) & 1, mode = take(in, 1);
	unsigned count = take(in, 2) % 300, need = take(in, 3) % 70000, hdr = HDR;
	unsigned head = take(in, 1), max_views = take(in, 2) % 1100, hint = take(in, 2);
	unsigned sendlen = take(in, 2) % 8192, nl = take(in, 1) % 8, i;
	uint64_t room = take(in, 3);
	uint32_t lengths[8], starts[512], gout[4], tail, counters[3];
	struct vp_tcp_fill wr;
	struct vp_tcp_read rd = { sock[0], MSG_DONTWAIT | (mode & 16 ? MSG_PEEK : 0) };
	uint8_t plain[HDR], gso[HDR], payload[8192];
	uint32_t *chrecs = calloc(3 * (size_t)num, sizeof(uint32_t));
	uint64_t *recs = calloc(3 * (size_t)num, sizeof(uint64_t)), out[13];
	uint32_t *elems = calloc(2 * (size_t)num, sizeof(uint32_t));
	uint32_t *spare = calloc(num, sizeof(uint32_t));
	struct vr_pop_ctx ctx;
	struct rings rg;
	long n;
	int got, pairs;

	if (mode & 2)
		hdr = take(in, 1) % 32;	/* vr_rx_commit() takes only 12: the rest is refused */
	for (i = 0; i < nl; i++)
		lengths[i] = take(in, 3);
	take_fill(in, plain, sizeof(plain));
	take_fill(in, gso, sizeof(gso));
	memset(&wr, 0, sizeof(wr));
	wr.six = take(in, 1) & 1;
	wr.tso_mss = take(in, 2);
	take_fill(in, wr.tmpl, sizeof(wr.tmpl));
	place_rings(g, in, num, &rg);
	ctx_init(&ctx, &rg, num, num);
	take_fill(in, payload, sendlen);
	guest_fill(g, in);
	if (mode & 4)
		shape_descs(g, (uint8_t *)rg.desc, rg.desc_len);
	if (mode & 32)
		shape_rx(&rg, num, last, mode & 64);
	if (mode & 1) {
		drain();
		if (sendlen)
			(void)!send(sock[1], payload, sendlen, MSG_DONTWAIT);
	}

	if (race)
		racer_start(g->areas, g->n, seed);
	if (mode & 1) {
		n = vr_rx_fill(&ctx, last, indirect, g->r, g->n, rg.used, rg.used_len, mode & 8,
			       count, need, hdr, head, max_views, hint, recs, chrecs, num,
			       (uintptr_t)vp_tcp_read, (uintptr_t)&rd, room,
			       (uintptr_t)vp_tcp_fill_writer, (uintptr_t)&wr, plain, gso,
			       take(in, 2), elems, spare, out);
		got = -1;
	} else {
		got = vr_rx_gather(&ctx, last, indirect, g->r, g->n, rg.used, rg.used_len,
				   mode & 8, count < num ? count : num, need, hdr, head, max_views,
				   hint, recs, chrecs, num, starts, gout);
		n = 0;
	}
	pairs = -1;
	if (got > 0)
		pairs = vr_rx_commit(g->r, g->n, recs, chrecs, gout[0], starts, (unsigned)got,
				     lengths, nl < (unsigned)got ? nl : (unsigned)got, plain, gso,
				     take(in, 2), hdr, elems, spare, &tail, counters);
	if (race)
		racer_stop();

	if (mode & 1) {
		CHECK(out[0] <= VR_FILL_COMMIT);
		CHECK(out[1] <= out[2] && out[2] <= num);
		CHECK(out[5] <= out[4] && out[4] <= 256);
		if (out[0] == VR_FILL_OK && n > 0) {
			CHECK(out[6] <= out[1] && out[7] <= out[1]);
			for (i = 0; i < out[6]; i++)
				CHECK(elems[2 * i] < num);
		}
		drain();
	} else if (got >= 0) {
		CHECK(gout[3] <= VR_GATHER_ERROR && gout[0] <= gout[1] && gout[1] <= num);
		for (i = 0; i < gout[0]; i++) {
			const uint64_t *r = recs + 3 * (size_t)i;

			CHECK(chrecs[3 * i] < num && chrecs[3 * i + 1] == 0 &&
			      chrecs[3 * i + 2] == 1);
			CHECK(r[0] < g->n && r[2] <= g->r[r[0]].size &&
			      r[1] <= g->r[r[0]].size - r[2]);
		}
		for (i = 0; i < (unsigned)got; i++)
			CHECK(starts[i] < gout[0] && (i == 0 || starts[i] > starts[i - 1]));
		if (pairs >= 0) {
			CHECK((unsigned)pairs <= gout[0] && tail <= gout[0]);
			for (i = 0; i < (unsigned)pairs; i++)
				CHECK(elems[2 * i] < num);
		}
	}
	(void)n;
	free(chrecs);
	free(recs);
	free(elems);
	free(spare);
	ctx_free(&ctx);
}

/* Records and chains as the caller passes them (not from a pop): vr_rx_layout(),
 * vr_read_frames(), vr_rx_commit() and vr_tx_frames() must refuse any that reach outside a
 * region. */
static void op_records(struct guest *g, struct in *in, int race, uint64_t seed)
{
	unsigned nrecs = 1 + take(in, 1) % 64, i, from = take(in, 1) % 70;
	unsigned need = take(in, 3) % 70000, head = take(in, 1), count = take(in, 1);
	unsigned views = take(in, 2) % 1100, dry = take(in, 1) & 1, nl = take(in, 1) % 8;
	unsigned sendlen = take(in, 2) % 8192, nchains = take(in, 1) % 16, hdr = take(in, 1) % 24;
	uint64_t recs[3 * 64], room = take(in, 3), bounce_len = take(in, 2);
	uint32_t chains[3 * 64], starts[256], lo[4], caps[256], lengths[8], elems[2 * 64];
	uint32_t spare[64], tail, counters[3];
	uint8_t plain[HDR] = { 0 }, gso[HDR] = { 0 }, payload[8192], *bounce, hdrs[24 * 16];
	uint64_t out[4 * 16];
	struct vp_tcp_read rd = { sock[0], MSG_DONTWAIT };
	int nf, pairs, done;
	long n;

	memset(recs, 0, sizeof(recs));
	memset(chains, 0, sizeof(chains));
	for (i = 0; i < nrecs; i++) {
		uint64_t region = take(in, 1);

		recs[3 * i] = region & 0x80 ? take(in, 8) : region % (g->n + 1);
		recs[3 * i + 1] = region & 0x40 ? take(in, 8) : take(in, 2);
		recs[3 * i + 2] = region & 0x20 ? take(in, 8) : take(in, 2);
		chains[3 * i] = take(in, 2);
		chains[3 * i + 1] = take(in, 1) % 4;
		chains[3 * i + 2] = take(in, 1) % 4;
	}
	for (i = 0; i < nl; i++)
		lengths[i] = take(in, 3);
	take_fill(in, payload, sendlen);
	guest_fill(g, in);
	bounce = malloc(bounce_len + 1);
	drain();
	if (sendlen)
		(void)!send(sock[1], payload, sendlen, MSG_DONTWAIT);

	if (race)
		racer_start(g->areas, g->n, seed);
	nf = vr_rx_layout(recs, nrecs, from, need ? need : 1, HDR, head, count < 256 ? count : 256,
			  views, dry, starts, lo);
	CHECK(nf >= 0 && nf <= 256);
	n = vr_read_frames((uintptr_t)vp_tcp_read, (uintptr_t)&rd, g->r, g->n, recs, nrecs,
			   starts, nf, HDR, need > HDR ? need - HDR : 0, head, room, caps);
	pairs = vr_rx_commit(g->r, g->n, recs, chains, nrecs, starts, nf, lengths,
			     nl < (unsigned)nf ? nl : (unsigned)nf, plain, gso, take(in, 2), HDR,
			     elems, spare, &tail, counters);
	done = vr_tx_frames(g->r, g->n, chains, nchains, recs, nrecs, hdr, take(in, 2), hdrs,
			    bounce, bounce_len, out);
	if (race)
		racer_stop();

	(void)n;
	CHECK(pairs < 0 || (unsigned)pairs <= nrecs);
	CHECK(done < 0 || (unsigned)done <= nchains);
	free(bounce);
	drain();
}

/* The used ring and the index accesses, with `num` as given (the C checks it). */
static void op_used(struct guest *g, struct in *in, int race, uint64_t seed)
{
	unsigned num = take(in, 2), nel = take(in, 1), idx = take(in, 2), i;
	uint32_t elems[2 * 256] = { 0 };
	struct rings rg;

	place_rings(g, in, num & 0x7fff, &rg);
	for (i = 0; i < 2 * nel; i++)
		elems[i] = take(in, 4);
	guest_fill(g, in);
	if (race)
		racer_start(g->areas, g->n, seed);
	(void)vr_avail_idx(rg.avail, rg.avail_len);
	(void)vr_avail_flags(rg.avail, rg.avail_len);
	(void)vr_avail_head(rg.avail, rg.avail_len, num, idx);
	(void)vr_used_event(rg.avail, rg.avail_len, num);
	(void)vr_used_put_many(rg.used, rg.used_len, num, idx, elems, nel);
	(void)vr_used_publish(rg.used, rg.used_len, idx + nel);
	(void)vr_used_idx(rg.used, rg.used_len);
	(void)vr_used_flags_set(rg.used, rg.used_len, idx);
	(void)vr_avail_event_set(rg.used, rg.used_len, num, idx);
	if (race)
		racer_stop();
}

/* The dirty log: a bitmap of input-chosen size, ranges from the input. */
static void op_log(struct in *in, int race, uint64_t seed)
{
	size_t len = take(in, 2) % 4097, k;
	uint8_t *log = calloc(len + 1, 1);
	struct racer_area a = { log, len };
	unsigned i, n = 1 + take(in, 1) % 8;

	if (race)
		racer_start(&a, 1, seed);
	for (i = 0; i < n; i++) {
		uint64_t addr = take(in, 1) & 1 ? take(in, 8) : take(in, 3) << 8;
		uint64_t size = take(in, 1) & 1 ? take(in, 8) : take(in, 3);
		int ret = vr_log_mark(log, len, addr, size);

		CHECK(ret == 0 || ret == -1);
	}
	if (race)
		racer_stop();
	for (k = 0; k < len; k++)	/* touch the whole log (ASan: it was all ours) */
		log[k] = 0;
	free(log);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct in in = { data, size };
	unsigned op = take(&in, 1), race = take(&in, 1) % 4 != 0, num;
	uint64_t seed = take(&in, 4) | 1;
	struct guest g;

	num = 1u << (take(&in, 1) % 10);	/* 1 .. 512 */
	if (op % 5 == 4) {
		op_log(&in, race, seed);
		return 0;
	}
	guest_map(&g, &in);
	switch (op % 5) {
	case 0:	/* the pop and the frame walk apart, or the one-call gather */
		if ((op / 5) & 1)
			op_tx_gather(&g, &in, num, race, seed);
		else
			op_tx(&g, &in, num, race, seed);
		break;
	case 1:
		op_rx(&g, &in, num, race, seed);
		break;
	case 2:
		op_records(&g, &in, race, seed);
		break;
	case 3:
		op_used(&g, &in, race, seed);
		break;
	}
	guest_unmap(&g);
	return 0;
}
