/* libFuzzer harness for the TCP data plane's C: virtio's vr_tx_offer() (net.c) handing
 * frames from "guest memory" to dataplane.c's dp_take_tx(), and the connection table
 * (dp_insert, dp_remove, the lookup) under a fuzzer-chosen sequence of operations.
 *
 * Guest memory is one heap allocation of exactly the region's size (ASan redzones at both
 * edges), and the frame records vr_tx_offer() gets come from the input unchecked (any
 * region, offset, length, kind): the offer must refuse the ones outside the region or the
 * bounce buffer. The racer rewrites guest memory during each offer, so a header read twice
 * would show. Invariants checked after every operation: the table holds exactly the flows
 * marked in_table, each found by its key; a taken frame left its connection's followups
 * listed once in `touched`. Input layout: see the take() calls in order. */
#include "net.c"
#include "dataplane.c"

#include "fuzz_common.h"

#define NFLOWS 16
#define CAP 32
#define MAX_RECS 8

static struct dp_flow flows[NFLOWS];
static struct dp_flow *slots[CAP];
static uint32_t touched[NFLOWS];
static struct dp_flow *touched_flows[NFLOWS];
static struct dp_payload payloads[MAX_RECS];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	racer_init();
	return 0;
}

static void check_table(const struct dp_table *t)
{
	unsigned i, n = 0, k;

	for (i = 0; i < NFLOWS; i++) {
		const struct dp_flow *f = &flows[i];

		if (!f->in_table)
			continue;
		n++;
		CHECK(dp_lookup(t, f->six, f->gaddr, f->gport, f->faddr, f->fport) == f);
	}
	CHECK(n == t->count);
	for (i = 0, k = 0; i < CAP; i++)
		k += slots[i] != NULL;
	CHECK(k == t->count);
	CHECK(t->ntouched <= t->touched_cap);
	for (i = 0; i < t->ntouched; i++) {
		CHECK(touched[i] < NFLOWS);
		CHECK(touched_flows[i] == &flows[touched[i]]);
		CHECK(flows[touched[i]].followups != 0);
		for (k = 0; k < i; k++)
			CHECK(touched[k] != touched[i]);
	}
}

/* A frame for flow f (or garbage), written into guest memory at off. */
static uint32_t write_frame(struct in *in, const struct dp_table *t, const struct dp_flow *f,
			    uint8_t *mem, size_t off, size_t room)
{
	uint8_t fr[ETH_HLEN + IP6_HLEN + TCP_HLEN];
	unsigned l4 = ETH_HLEN + (f->six ? IP6_HLEN : IP4_HLEN), len = l4 + TCP_HLEN;

	memset(fr, 0, sizeof(fr));
	memcpy(fr + 6, t->guest_mac, 6);
	if (f->six) {
		fr[12] = 0x86, fr[13] = 0xDD, fr[ETH_HLEN] = 0x60;
		fr[ETH_HLEN + 5] = TCP_HLEN, fr[ETH_HLEN + 6] = 6;
		memcpy(fr + ETH_HLEN + 8, f->gaddr, 16);
		memcpy(fr + ETH_HLEN + 24, f->faddr, 16);
	} else {
		fr[12] = 0x08, fr[ETH_HLEN] = 0x45, fr[ETH_HLEN + 3] = IP4_HLEN + TCP_HLEN;
		fr[ETH_HLEN + 9] = 6;
		memcpy(fr + ETH_HLEN + 12, f->gaddr, 4);
		memcpy(fr + ETH_HLEN + 16, f->faddr, 4);
	}
	fr[l4] = f->gport >> 8, fr[l4 + 1] = f->gport & 0xff;
	fr[l4 + 2] = f->fport >> 8, fr[l4 + 3] = f->fport & 0xff;
	memcpy(fr + l4 + 4, &f->seq_from_tap, 4);	/* host order: often not in sequence */
	if (take(in, 1) & 1) {
		uint32_t seq = f->seq_from_tap, ack = f->seq_ack_from_tap + (uint32_t)take(in, 2);

		fr[l4 + 4] = seq >> 24, fr[l4 + 5] = seq >> 16, fr[l4 + 6] = seq >> 8, fr[l4 + 7] = seq;
		fr[l4 + 8] = ack >> 24, fr[l4 + 9] = ack >> 16, fr[l4 + 10] = ack >> 8, fr[l4 + 11] = ack;
	}
	fr[l4 + 12] = 0x50, fr[l4 + 13] = TCP_ACK;
	fr[l4 + 14] = (uint8_t)take(in, 1), fr[l4 + 15] = (uint8_t)take(in, 1);
	if (take(in, 1) == 0xAA) {	/* a byte of the headers flipped */
		unsigned at = (unsigned)take(in, 1) % len;

		fr[at] ^= (uint8_t)take(in, 1) | 1;
	}
	if (room < len)
		len = (unsigned)room;
	memcpy(mem + off, fr, len);
	return len;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct in in = { data, size };
	struct dp_table t;
	struct vr_region region;
	uint8_t hdrs[12 * MAX_RECS], bounce[256], *mem;
	uint64_t out[4 * MAX_RECS];
	size_t mem_len = 64 + take(&in, 2) % 4096;
	unsigned ops, op, i;
	struct racer_area area;
	int racing;

	memset(&t, 0, sizeof(t));
	memset(flows, 0, sizeof(flows));
	memset(slots, 0, sizeof(slots));
	t.slots = slots;
	t.cap = CAP;
	t.touched = touched;
	t.touched_flows = touched_flows;
	t.touched_cap = NFLOWS;
	t.payloads = payloads;
	t.payloads_cap = MAX_RECS;
	t.established = 3;
	t.rto_min = 0.2;
	t.rto_max = 60;
	t.now = 1000;
	memcpy(t.guest_mac, "\x02\0\0\0\0\x02", 6);
	t.seen4 = 0xC0000202;
	memcpy(t.learned6, "\x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x02", 16);
	for (i = 0; i < NFLOWS; i++) {
		struct dp_flow *f = &flows[i];

		f->id = i;
		f->fd = -1;	/* writes fail (EBADF): a reset followup */
		f->six = (int32_t)(take(&in, 1) & 1);
		memcpy(f->gaddr, f->six ? t.learned6 : (const uint8_t *)"\xC0\0\x02\x02", f->six ? 16 : 4);
		f->faddr[0] = 198, f->faddr[1] = 51, f->faddr[2] = 100, f->faddr[3] = (uint8_t)(i % 3);
		f->gport = (uint16_t)(40000 + i % 5);
		f->fport = (uint16_t)(80 + i / 5);
		f->state = (int32_t)(take(&in, 1) % 5);
		f->seq_from_tap = f->seq_ack_to_tap = (uint32_t)take(&in, 4);
		f->seq_ack_from_tap = (uint32_t)take(&in, 4);
		f->seq_to_tap = f->seq_ack_from_tap + (uint32_t)take(&in, 2);
		f->seq_max = f->seq_to_tap + (uint32_t)take(&in, 1);
		f->ws_from_tap = (uint32_t)take(&in, 1);	/* any value: the shift is masked */
		f->rtt_pending = (int32_t)(take(&in, 1) & 1);
		f->rtt_seq = f->seq_ack_from_tap + (uint32_t)take(&in, 2);
		f->srtt = -1;
		f->rto = 1;
		f->rto_timer_set = (int32_t)(take(&in, 1) & 1);
		f->rto_when = 1000.5;
		f->dup_acks = (uint32_t)take(&in, 1) % 3;
	}
	mem = malloc(mem_len);
	CHECK(mem);
	memset(mem, 0, mem_len);
	region.gpa = 0x100000;
	region.size = mem_len;
	region.host = mem;
	memset(hdrs, 0, sizeof(hdrs));

	for (ops = 0; ops < 64 && in.n; ops++) {
		op = (unsigned)take(&in, 1);
		struct dp_flow *f = &flows[(op >> 2) % NFLOWS];

		switch (op & 3) {
		case 0:
			if (dp_insert(&t, f) == 0)
				CHECK(f->in_table);
			break;
		case 1:
			dp_remove(&t, f);
			CHECK(!f->in_table);
			break;
		default: {	/* a batch of frames offered */
			unsigned n = 1 + (unsigned)take(&in, 1) % MAX_RECS, k;
			size_t off = 0;

			dp_pass_begin(&t);
			for (k = 0; k < n; k++) {
				uint64_t *o = out + 4 * k;
				struct dp_flow *g = &flows[(unsigned)take(&in, 1) % NFLOWS];
				unsigned how = (unsigned)take(&in, 1);

				o[0] = how % 5;		/* GUEST, COPY, SHORT, BIG, TAKEN */
				o[1] = how & 0x80 ? take(&in, 1) : 0;	/* a region that may not exist */
				o[2] = off;
				o[3] = 0;
				if (o[0] == VR_TX_COPY) {
					o[2] = take(&in, 1);
					o[3] = write_frame(&in, &t, g, bounce, o[2] % sizeof(bounce),
							   sizeof(bounce) - o[2] % sizeof(bounce));
					if (how & 0x40)
						o[3] += take(&in, 2);	/* past the bounce */
				} else if (off < mem_len) {
					o[3] = write_frame(&in, &t, g, mem, off, mem_len - off);
					off += o[3];
					if (how & 0x40)
						o[3] += take(&in, 2);	/* past the region */
				}
				hdrs[12 * k + 1] = (how & 0x20) ? 4 : 0;	/* gso_type */
			}
			area.p = mem;
			area.len = mem_len;
			racing = racer_start(&area, 1, op);
			vr_tx_offer((uintptr_t)dp_take_tx, (uintptr_t)dp_tx_end, (uintptr_t)&t,
				    op & 0x80 ? F_HOST_TSO4 | F_HOST_TSO6 : 0, &region, 1, hdrs, 12,
				    bounce, sizeof(bounce), out, n);
			if (racing)
				racer_stop();
			check_table(&t);
			for (k = 0; k < t.ntouched; k++)	/* Python's after_pass() */
				flows[touched[k]].followups = 0;
			t.ntouched = 0;
			break;
		}
		}
		check_table(&t);
	}
	free(mem);
	return 0;
}
