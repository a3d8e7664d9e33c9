/* libFuzzer harness for the frame C in cffi_build/: the RFC 1071 sum (checksum.c), TCP frames
 * written in place (tcpseg.c's vp_tcp_frames, tcpsg.c's scattered vp_tcp_frames_sg_tso and
 * the vr_rx_fill() writer vp_tcp_fill_writer, tcp_vu.c) and the recvmmsg()/sendmmsg() wrappers
 * (mmsg.c), all over buffers that stand for guest memory: each its own heap allocation of
 * exactly the length the caller passes (ASan redzones at every edge), rewritten by the racer
 * (fuzz_common.h) while the call runs.
 *
 * Without the race the results are checked against a byte-at-a-time reference sum: the
 * partial sums agree, and every frame written carries a valid IPv4 header checksum and a TCP
 * checksum that verifies over the pseudo-header (the oracle a guest applies). Input layout:
 * see the take() calls in order. */
#include "mmsg.c"	/* first: it defines _GNU_SOURCE */
#include "checksum.c"
#include "tcpseg.c"
#include "tcpsg.c"
#include "tcp_vu.c"

#include <unistd.h>

#include "fuzz_common.h"

#define MAX_FRAMES 8
#define MAX_PIECES 24
#define HL(six) (ETH_HLEN + ((six) ? IP6_HLEN : IP4_HLEN))

static int dgram[2] = { -1, -1 };

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	racer_init();
	if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, dgram)) {
		perror("socketpair");
		abort();
	}
	return 0;
}

/* The reference: RFC 1071 over big-endian 16-bit words, a byte at a time. */
static uint64_t ref_sum(const uint8_t *p, size_t len, uint64_t sum, int *odd)
{
	size_t i;

	for (i = 0; i < len; i++, *odd ^= 1)
		sum += *odd ? p[i] : (uint32_t)p[i] << 8;
	return sum;
}

static uint16_t ref_fold(uint64_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)sum;
}

/* The pseudo-header's addresses and protocol, summed (what tcp.py passes as `pseudo`). */
static uint32_t pseudo_of(const uint8_t *tmpl, int six)
{
	int odd = 0;
	uint64_t s = six ? ref_sum(tmpl + ETH_HLEN + 8, 32, 0, &odd)
			 : ref_sum(tmpl + ETH_HLEN + 12, 8, 0, &odd);

	return ref_fold(s + 6);
}

/* The caller's template: checksum fields zero (the C sums over them). */
static void template_from(struct in *in, uint8_t *tmpl, int six)
{
	take_fill(in, tmpl, ETH_HLEN + IP6_HLEN + TCP_HLEN);
	if (!six)
		memset(tmpl + ETH_HLEN + 10, 0, 2);
	memset(tmpl + HL(six) + 16, 0, 2);
}

/* A frame written by the C: IPv4 header sum and TCP sum over pieces verify. */
static void check_frame(uint8_t *const *bufs, const uint32_t *lens, unsigned start,
			unsigned end, uint32_t size, int six, const uint8_t *tmpl, uint32_t len)
{
	unsigned hl = HL(six), p;
	uint32_t l4 = TCP_HLEN + size, left = l4;
	uint64_t sum = pseudo_of(tmpl, six) + l4;
	int odd = 0;

	CHECK(len == hl + l4);
	if (!six) {
		int o = 0;

		CHECK(ref_fold(ref_sum(bufs[start] + ETH_HLEN, IP4_HLEN, 0, &o)) == 0xffff);
	}
	for (p = start; p < end && left; p++) {
		uint32_t off = p == start ? hl : 0, k = lens[p] - off;

		if (k > left)
			k = left;
		sum = ref_sum(bufs[p] + off, k, sum, &odd);
		left -= k;
	}
	CHECK(left == 0);
	CHECK(ref_fold(sum) == 0xffff);
}

struct pieces {
	uint8_t *bufs[MAX_PIECES];
	uint32_t lens[MAX_PIECES];
	struct racer_area areas[RACER_MAX_AREAS];
	unsigned n;
};

static void pieces_alloc(struct pieces *ps, struct in *in, unsigned n, uint32_t min_first)
{
	unsigned i;

	ps->n = n;
	for (i = 0; i < n; i++) {
		ps->lens[i] = take(in, 2) % 2048 + (i == 0 ? min_first : 0);
		ps->bufs[i] = malloc(ps->lens[i] + 1);
		take_fill(in, ps->bufs[i], ps->lens[i]);
		if (i < RACER_MAX_AREAS) {
			ps->areas[i].p = ps->bufs[i];
			ps->areas[i].len = ps->lens[i];
		}
	}
}

static void pieces_free(struct pieces *ps)
{
	unsigned i;

	for (i = 0; i < ps->n; i++)
		free(ps->bufs[i]);
}

static void op_csum(struct in *in, int race, uint64_t seed)
{
	size_t len = take(in, 2) % 9000;
	uint32_t init = take(in, 4), got;
	uint8_t *buf = malloc(len + 1);
	struct racer_area a = { buf, len };
	int odd = 0;

	take_fill(in, buf, len);
	race = race && racer_start(&a, 1, seed);
	got = vp_csum_partial(buf, len, init);
	(void)vp_csum_fold(got);
	if (race)
		racer_stop();
	else
		CHECK(ref_fold(got) == ref_fold(ref_sum(buf, len, init, &odd)));
	free(buf);
}

/* tcpseg.c: each frame one buffer of exactly headers + payload, as tcp.py allocates. */
static void op_seg(struct in *in, int race, uint64_t seed)
{
	unsigned n = 1 + take(in, 1) % MAX_FRAMES, i, six = take(in, 1) & 1;
	uint8_t tmpl[ETH_HLEN + IP6_HLEN + TCP_HLEN];
	uint32_t sizes[MAX_FRAMES], out_lens[MAX_FRAMES];
	uint8_t *bufs[MAX_FRAMES];
	struct racer_area areas[MAX_FRAMES];
	uint32_t seq = take(in, 4), next;

	template_from(in, tmpl, six);
	for (i = 0; i < n; i++) {
		sizes[i] = take(in, 2) % 2000;
		bufs[i] = malloc(HL(six) + TCP_HLEN + sizes[i]);
		take_fill(in, bufs[i] + HL(six) + TCP_HLEN, sizes[i]);
		areas[i].p = bufs[i];
		areas[i].len = HL(six) + TCP_HLEN + sizes[i];
	}
	race = race && racer_start(areas, n, seed);
	next = vp_tcp_frames(bufs, sizes, n, tmpl, six, pseudo_of(tmpl, six), seq, 1, 2, 0x10,
			     0x18, out_lens);
	if (race)
		racer_stop();
	for (i = 0; i < n; i++) {
		seq += sizes[i];
		if (!race) {
			uint32_t len = HL(six) + TCP_HLEN + sizes[i];

			check_frame(&bufs[i], &len, 0, 1, sizes[i], six, tmpl, out_lens[i]);
		}
		free(bufs[i]);
	}
	CHECK(next == seq);
}

/* tcpsg.c: frames over scattered pieces of input-chosen lengths, sizes as given (the C must
 * refuse what the pieces cannot hold). */
static void op_sg(struct in *in, int race, uint64_t seed)
{
	unsigned npieces = 1 + take(in, 1) % MAX_PIECES, n = 1 + take(in, 1) % MAX_FRAMES, i;
	unsigned six = take(in, 1) & 1, csum = take(in, 1) & 1, shuffle = take(in, 1);
	uint32_t first[MAX_FRAMES + 1], sizes[MAX_FRAMES], out_lens[MAX_FRAMES];
	uint32_t tso = take(in, 1) & 1 ? take(in, 2) : 0, seq = take(in, 4);
	uint8_t tmpl[ETH_HLEN + IP6_HLEN + TCP_HLEN];
	struct pieces ps;
	int64_t next;

	template_from(in, tmpl, six);
	/* frame boundaries: increasing, inside the pieces unless the input says otherwise */
	first[0] = 0;
	for (i = 1; i <= n; i++)
		first[i] = first[i - 1] + 1 + take(in, 1) % 4;
	if (shuffle & 1)
		first[take(in, 1) % (n + 1)] = take(in, 1) % (MAX_PIECES + 2);
	for (i = 0; i < n; i++)
		sizes[i] = take(in, 1) & 1 ? take(in, 4) : take(in, 2) % 8192;
	pieces_alloc(&ps, in, npieces, shuffle & 2 ? 0 : HL(six) + TCP_HLEN);
	race = race && racer_start(ps.areas, RACER_AREAS(npieces), seed);
	next = vp_tcp_frames_sg_tso(ps.bufs, ps.lens, npieces, first, sizes, n, tmpl, six,
				    pseudo_of(tmpl, six), seq, 7, 8, 0x10, 0x18, csum, tso,
				    out_lens);
	if (race)
		racer_stop();
	if (next >= 0) {
		for (i = 0; i < n; i++) {
			CHECK(first[i] < first[i + 1] && first[i + 1] <= npieces);
			if (!race && csum && !(tso && sizes[i] > tso))
				check_frame(ps.bufs, ps.lens, first[i], first[i + 1], sizes[i], six,
					    tmpl, out_lens[i]);
			seq += sizes[i];
		}
		CHECK((uint32_t)next == seq);
	}
	pieces_free(&ps);
}

/* tcpsg.c's vr_rx_fill() writer: first buffers of the lengths the ring gives. */
static void op_fill_writer(struct in *in, int race, uint64_t seed)
{
	unsigned n = take(in, 1) % (MAX_PIECES + 1), i, npieces = n;
	struct vp_tcp_fill f;
	uint32_t sizes[MAX_PIECES], lens[MAX_PIECES];
	struct pieces ps;

	memset(&f, 0, sizeof(f));
	f.six = take(in, 1) & 1;
	f.tso_mss = take(in, 2);
	f.seq = take(in, 4);
	template_from(in, f.tmpl, f.six);
	f.pseudo = pseudo_of(f.tmpl, f.six);
	pieces_alloc(&ps, in, npieces, 0);
	for (i = 0; i < n; i++)
		sizes[i] = take(in, 2);
	race = race && racer_start(ps.areas, RACER_AREAS(npieces), seed);
	(void)vp_tcp_fill_writer(&f, ps.bufs, ps.lens, sizes, npieces, lens);
	if (race)
		racer_stop();
	pieces_free(&ps);
}

/* mmsg.c: datagrams out of and into buffers of the lengths passed. */
static void op_mmsg(struct in *in, int race, uint64_t seed)
{
	unsigned n = take(in, 1) % (VP_MMSG_MAX + 8), i, k;
	uint8_t *bufs[VP_MMSG_MAX + 8];
	size_t lens[VP_MMSG_MAX + 8], out_lens[VP_MMSG_MAX];
	int flags[VP_MMSG_MAX], sent, got;
	struct vp_addr addrs[VP_MMSG_MAX], dsts[VP_MMSG_MAX];
	struct racer_area areas[RACER_MAX_AREAS];
	uint8_t drainbuf[2048];

	for (i = 0; i < n; i++) {
		lens[i] = take(in, 2) % 2048;
		bufs[i] = malloc(lens[i] + 1);
		take_fill(in, bufs[i], lens[i]);
		if (i < RACER_MAX_AREAS) {
			areas[i].p = bufs[i];
			areas[i].len = lens[i];
		}
	}
	race = race && racer_start(areas, RACER_AREAS(n), seed);
	sent = vp_sendmmsg(dgram[1], bufs, lens, n);
	k = take(in, 1);
	got = vp_recvmmsg(dgram[0], bufs, lens, n, out_lens, flags, k & 1 ? addrs : NULL,
			  k & 2 ? dsts : NULL);
	if (race)
		racer_stop();
	CHECK(sent <= VP_MMSG_MAX && got <= VP_MMSG_MAX);
	for (k = 0; got > 0 && k < (unsigned)got; k++)
		CHECK(out_lens[k] <= lens[k] || (flags[k] & MSG_TRUNC));
	for (k = 0; k < 2 * VP_MMSG_MAX && recv(dgram[0], drainbuf, sizeof(drainbuf),
						 MSG_DONTWAIT) >= 0; k++)
		;
	for (i = 0; i < n; i++)
		free(bufs[i]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct in in = { data, size };
	unsigned op = take(&in, 1), race = take(&in, 1) % 4 != 0;
	uint64_t seed = take(&in, 4) | 1;

	switch (op % 5) {
	case 0:
		op_csum(&in, race, seed);
		break;
	case 1:
		op_seg(&in, race, seed);
		break;
	case 2:
		op_sg(&in, race, seed);
		break;
	case 3:
		op_fill_writer(&in, race, seed);
		break;
	case 4:
		op_mmsg(&in, race, seed);
		break;
	}
	return 0;
}
