/* libFuzzer harness for the data plane's fill (dataplane.c's dp_fill()): the connection's
 * fields from the input (any window, scale, MSS, sequence numbers, flags), a socket pair with
 * fuzzer-chosen bytes queued (or no socket), and in place of virtio's vr_rx_fill() a stub
 * that checks the arguments dp_fill() passes (the frame count, lengths, room, the headers'
 * and writer's fields) and answers with a fuzzer-chosen outcome, byte count and room.
 * Checked after each call: what dp_fill() says it did agrees with the record (a fill run
 * only when it says so; seq_to_tap moved only by a sent fill and never past the window;
 * the data-ACK memo holds what the frames carried). UBSan catches shifts and overflows the
 * fields could cause. (vr_rx_fill() itself, with tcp_vu.c's reader and writer over guest
 * memory, is ring_fuzz.c's.) Input layout: see the take() calls in order. */
#include <sys/ioctl.h>
#include <unistd.h>

#include "dataplane.c"

#include "fuzz_common.h"

static struct {
	struct in *in;
	int called;
	unsigned count, need, head;
	uint64_t room;
	long n;
	uint64_t outcome, sent, caps;
} stub;

static long fill_stub(void *ctx, unsigned last_avail, int indirect, const void *regions,
		      unsigned nregions, uint8_t *used, size_t used_len, int rearm, unsigned count,
		      unsigned need, unsigned hdr, unsigned head, unsigned max_views,
		      unsigned hint, uint64_t *recs, uint32_t *chrecs, unsigned cap,
		      uintptr_t reader, uintptr_t reader_arg, uint64_t room, uintptr_t writer,
		      uintptr_t writer_arg, const uint8_t *plain, const uint8_t *gso,
		      uint32_t gso_from, uint32_t *elems, uint32_t *spare, uint64_t *out)
{
	(void)ctx, (void)last_avail, (void)indirect, (void)regions, (void)nregions, (void)used;
	(void)used_len, (void)rearm, (void)max_views, (void)hint, (void)recs, (void)chrecs;
	(void)cap, (void)reader, (void)reader_arg, (void)writer, (void)elems, (void)spare;
	CHECK(!stub.called);
	stub.called = 1;
	CHECK(count >= 1 && count <= SEG_BATCH);
	CHECK(hdr == VNET_HDR_LEN && (head == 54 || head == 74));
	CHECK(need > hdr + head && need - hdr - head <= TSO_MAX_L3);
	CHECK(room > 0 && room <= MAX_WINDOW);
	CHECK(plain[0] == 2 && gso_from > 0);
	CHECK(gso[0] == 2 || (gso[0] == 1 && (gso[1] == 1 || gso[1] == 4)));
	CHECK(writer_arg != 0);
	stub.count = count;
	stub.need = need;
	stub.head = head;
	stub.room = room;
	memset(out, 0, 13 * sizeof(*out));
	out[0] = stub.outcome = take(stub.in, 1) % 9;
	out[5] = stub.sent = take(stub.in, 1) % (count + 1);
	out[11] = stub.caps = take(stub.in, 4) % (room + 2);
	stub.n = (long)(int32_t)take(stub.in, 4);
	if (stub.n > (long)room)
		stub.n = (long)room;
	if (out[0] == 0 && stub.sent) {	/* a writer moves seq on past the frames */
		struct vp_tcp_fill *f = (struct vp_tcp_fill *)writer_arg;

		f->seq += stub.n > 0 ? (uint32_t)stub.n : 0;
	}
	return stub.n;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct in in = { data, size };
	struct dp_table t;
	struct dp_flow f;
	struct dp_rx rx;
	struct vp_tcp_fill writer;
	struct vp_tcp_read reader;
	uint64_t res[6], out[13];
	uint8_t queued[4096];
	int sv[2] = { -1, -1 }, rc;
	uint32_t seq_before, in_flight;
	size_t nq;

	memset(&t, 0, sizeof(t));
	memset(&f, 0, sizeof(f));
	memset(&rx, 0, sizeof(rx));
	memset(&writer, 0, sizeof(writer));
	t.established = 3;
	t.now = 100;
	t.rto_min = 0.2;
	t.rto_max = 60;
	memcpy(t.guest_mac, "\x52\x54\0\x12\x34\x56", 6);
	f.in_table = 1;
	f.state = take(&in, 1) & 1 ? 3 : (int32_t)take(&in, 1);
	f.six = (int32_t)(take(&in, 1) & 1);
	f.fin_sent = (int32_t)(take(&in, 1) % 8 == 0);
	f.seq_ack_from_tap = (uint32_t)take(&in, 4);
	f.seq_to_tap = f.seq_ack_from_tap + (uint32_t)take(&in, 3);
	f.seq_max = f.seq_to_tap + (uint32_t)take(&in, 1);
	f.seq_from_tap = (uint32_t)take(&in, 4);
	f.seq_ack_to_tap = f.seq_from_tap - (uint32_t)take(&in, 1);
	f.wnd_from_tap = (uint32_t)take(&in, 4) % (MAX_WINDOW + 1);
	f.ws_to_tap = (uint32_t)take(&in, 1);	/* any value: the shift is masked */
	f.mss = (uint32_t)take(&in, 2);
	f.peek_full = (int32_t)(take(&in, 1) & 1);
	f.drained = (int32_t)(take(&in, 1) & 1);
	f.peer_closed = (int32_t)(take(&in, 1) & 1);
	f.local = (int32_t)(take(&in, 1) & 1);
	f.sndbuf = (uint32_t)take(&in, 4);
	f.discard_due = take(&in, 2);
	f.rto = 1;
	f.rto_timer_set = (int32_t)(take(&in, 1) & 1);
	f.rto_when = 100.5;
	f.data_ack_valid = (int32_t)(take(&in, 1) & 1);
	f.data_ack_seq = f.seq_from_tap;
	f.data_ack_ack = f.seq_ack_to_tap;
	f.data_ack_time = 100;
	f.tmpl_valid = (int32_t)(take(&in, 1) % 8 != 0);
	memcpy(f.tmpl_mac, t.guest_mac, 6);
	rx.tso4 = (int32_t)(take(&in, 1) & 1);
	rx.tso6 = (int32_t)(take(&in, 1) & 1);
	rx.fill = (uintptr_t)fill_stub;
	rx.writer_arg = (uintptr_t)&writer;
	rx.reader_arg = (uintptr_t)&reader;
	rx.out = (uintptr_t)out;
	f.fd = -1;
	if (take(&in, 1) & 1 && !socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv)) {
		nq = take(&in, 2) % sizeof(queued);
		take_fill(&in, queued, nq);
		if (nq)
			CHECK(write(sv[1], queued, nq) == (ssize_t)nq);
		f.fd = sv[0];
	}
	stub.in = &in;
	stub.called = 0;
	seq_before = f.seq_to_tap;
	in_flight = f.seq_to_tap - f.seq_ack_from_tap;
	rc = dp_fill(&t, &rx, &f, res);
	CHECK(rc == DP_FILL_DONE || rc == DP_FILL_PYTHON);
	CHECK(res[1] == (uint64_t)stub.called);
	CHECK(f.discard_due == 0 || f.state != 3);
	if (!stub.called) {
		CHECK(f.seq_to_tap == seq_before);
	} else {
		CHECK(res[2] + VNET_HDR_LEN == stub.need && res[3] == stub.room);
		CHECK(stub.room == (uint64_t)((int64_t)f.wnd_from_tap - in_flight));
		CHECK(writer.ack == res[4] && writer.wnd == res[5]);
		CHECK(f.data_ack_valid && f.data_ack_ack == res[4] && f.data_ack_wnd == res[5]);
		if (rc == DP_FILL_DONE) {
			CHECK(stub.outcome == 0 && stub.n > 0);
			if (stub.sent)
				CHECK(f.seq_to_tap == seq_before + (uint32_t)stub.n &&
				      f.seq_ack_to_tap == res[4]);
			else
				CHECK(f.seq_to_tap == seq_before);
		} else {
			CHECK(f.seq_to_tap == seq_before);
		}
	}
	if (sv[0] >= 0) {
		close(sv[0]);
		close(sv[1]);
	}
	return 0;
}
