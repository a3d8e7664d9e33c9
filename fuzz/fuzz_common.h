/* What the libFuzzer harnesses in fuzz/ share: reading the fuzzer's input as a stream of
 * little-endian fields, and the racer, a second thread that rewrites "guest memory" with
 * random bytes while the code under test runs.
 *
 * Why a racer: guest memory is shared with a guest (or a hostile front end) that may change
 * it at any moment. C that reads a guest value twice (a length checked, then re-read to copy)
 * is a double fetch: the second read can see a value the check never saw. The racer makes
 * that happen, and ASan then reports the out-of-bounds access the unchecked value leads to.
 * It is probabilistic: a harness hands it the areas to scribble on, racer_start() returns
 * once the racer is writing, and racer_stop() once it has stopped, so every call under test
 * runs wholly inside a window of rewrites. FUZZ_NO_RACE=1 in the environment turns it off
 * (a deterministic run, to reproduce a crash that does not involve the race).
 *
 * Each harness is one translation unit that #includes the C it tests (from cffi_build/) and
 * this header; everything here is static. */
#ifndef FUZZ_COMMON_H
#define FUZZ_COMMON_H

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* --- input fields --------------------------------------------------------------------------- */

struct in {
	const uint8_t *p;
	size_t n;
};

/* The next `bytes` (<= 8) bytes as a little-endian value; zeros past the end of the input. */
static uint64_t take(struct in *in, unsigned bytes)
{
	uint64_t v = 0;
	unsigned i;

	for (i = 0; i < bytes; i++) {
		if (in->n) {
			v |= (uint64_t)in->p[0] << (8 * i);
			in->p++;
			in->n--;
		}
	}
	return v;
}

/* Fill `dst` with what is left of the input (then zeros); consumes what it copies. */
static void take_fill(struct in *in, uint8_t *dst, size_t len)
{
	size_t k = in->n < len ? in->n : len;

	memcpy(dst, in->p, k);
	memset(dst + k, 0, len - k);
	in->p += k;
	in->n -= k;
}

/* A harness invariant broken: abort, so libFuzzer keeps the input as a crash. */
#define CHECK(cond)                                                                         \
	do {                                                                                \
		if (!(cond)) {                                                              \
			fprintf(stderr, "%s:%d: invariant broken: %s\n", __FILE__, __LINE__, \
				#cond);                                                     \
			abort();                                                            \
		}                                                                           \
	} while (0)

/* --- the racer ------------------------------------------------------------------------------ */

#define RACER_MAX_AREAS 8

struct racer_area {
	uint8_t *p;
	size_t len;
};

static struct {
	pthread_mutex_t lock;
	pthread_cond_t wake;
	struct racer_area areas[RACER_MAX_AREAS];
	unsigned nareas;
	int active;		/* written under lock, read by the racer without it */
	int running;		/* the racer's answer: 1 writing, 0 idle */
	int disabled;		/* FUZZ_NO_RACE */
	uint64_t seed;
	unsigned long races;	/* racer_start() calls that raced (statistics) */
	unsigned long rewrites;	/* bytes rewritten */
} racer = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER };

static uint64_t racer_rand(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static void *racer_main(void *arg)
{
	uint64_t s = 0x9e3779b97f4a7c15ULL;

	(void)arg;
	for (;;) {
		pthread_mutex_lock(&racer.lock);
		while (!racer.active)
			pthread_cond_wait(&racer.wake, &racer.lock);
		s ^= racer.seed;
		pthread_mutex_unlock(&racer.lock);
		__atomic_store_n(&racer.running, 1, __ATOMIC_RELEASE);
		while (__atomic_load_n(&racer.active, __ATOMIC_ACQUIRE)) {
			uint64_t r = racer_rand(&s);
			const struct racer_area *a = &racer.areas[r % racer.nareas];
			size_t off, k, n;

			if (!a->len)
				continue;
			off = (r >> 8) % a->len;
			n = 1 + (r >> 40) % 16;	/* a short burst: a field, or two */
			for (k = 0; k < n && off + k < a->len; k++)
				__atomic_store_n(a->p + off + k, (uint8_t)racer_rand(&s),
						 __ATOMIC_RELAXED);
			__atomic_fetch_add(&racer.rewrites, k, __ATOMIC_RELAXED);
		}
		__atomic_store_n(&racer.running, 0, __ATOMIC_RELEASE);
	}
	return NULL;
}

static void racer_report(void)
{
	fprintf(stderr, "racer: %lu calls raced, %lu guest bytes rewritten during them\n",
		racer.races, __atomic_load_n(&racer.rewrites, __ATOMIC_RELAXED));
}

static void racer_init(void)
{
	static int started;
	pthread_t t;

	if (started)
		return;
	started = 1;
	racer.disabled = getenv("FUZZ_NO_RACE") && atoi(getenv("FUZZ_NO_RACE"));
	if (racer.disabled)
		return;
	if (pthread_create(&t, NULL, racer_main, NULL)) {
		perror("pthread_create");
		abort();
	}
	pthread_detach(t);
	atexit(racer_report);
}

#define RACER_AREAS(n) ((n) < RACER_MAX_AREAS ? (n) : RACER_MAX_AREAS)

/* Start rewriting `n` areas; returns 1 once the racer writes, 0 if it is off (or no area). */
static int racer_start(const struct racer_area *areas, unsigned n, uint64_t seed)
{
	unsigned i, k = 0;

	if (racer.disabled)
		return 0;
	pthread_mutex_lock(&racer.lock);
	for (i = 0; i < n && k < RACER_MAX_AREAS; i++)
		if (areas[i].p && areas[i].len)
			racer.areas[k++] = areas[i];
	racer.nareas = k;
	racer.seed = seed;
	if (k)
		__atomic_store_n(&racer.active, 1, __ATOMIC_RELEASE);
	pthread_cond_signal(&racer.wake);
	pthread_mutex_unlock(&racer.lock);
	if (!k)
		return 0;
	while (!__atomic_load_n(&racer.running, __ATOMIC_ACQUIRE))
		sched_yield();
	racer.races++;
	return 1;
}

/* Stop the racer and wait until it no longer touches the areas (they may be freed then). */
static void racer_stop(void)
{
	if (racer.disabled)
		return;
	__atomic_store_n(&racer.active, 0, __ATOMIC_RELEASE);
	while (__atomic_load_n(&racer.running, __ATOMIC_ACQUIRE))
		sched_yield();
}

#endif
