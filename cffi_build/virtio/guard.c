/* Guards for the vhost-user back end against a hostile front end (see virtio/guard.py for the
 * theory of operation):
 *
 * - a SIGBUS handler over registered guest mappings: a front end that shrinks a memory file
 *   after we mapped it makes our next access to the lost pages fault with SIGBUS. If the
 *   faulting address lies in a registered mapping, anonymous zero pages are mapped over the
 *   faulting page (MAP_FIXED) so the access completes, and the fault is counted for that
 *   registration; the back end sees the count move and drops that front end. A fault
 *   anywhere else restores the previous action and returns: the access faults again and the
 *   process dies as it would have (a kill(SIGBUS) is re-raised).
 * - eventfd reads that never block (preadv2 RWF_NOWAIT: the front end shares the file
 *   description and may clear O_NONBLOCK), and eventfd writes bounded in time by a watchdog
 *   timer whose signal (no SA_RESTART) interrupts a write the front end made blocking.
 *
 * Everything the signal handlers touch is static storage (no TLS, no allocation).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define VG_SLOTS 256

struct vg_slot {
    volatile uintptr_t start;
    volatile uintptr_t end; /* 0: free; written last on register, first on unregister */
    volatile uintptr_t page;
    volatile long faults;
};

static struct vg_slot vg_slots[VG_SLOTS];
static volatile long vg_event_count; /* faults and stalled writes, any registration */
static struct sigaction vg_old_bus;

static void vg_on_sigbus(int sig, siginfo_t *si, void *uc)
{
    int saved = errno;
    uintptr_t a = (uintptr_t)si->si_addr;
    int i;

    (void)sig;
    (void)uc;
    if (si->si_code > 0) { /* raised by the kernel for an access, not sent */
        for (i = 0; i < VG_SLOTS; i++) {
            struct vg_slot *s = &vg_slots[i];
            uintptr_t end = s->end;

            if (end && a >= s->start && a < end) {
                uintptr_t p = a & ~(s->page - 1);

                if (mmap((void *)p, s->page, PROT_READ | PROT_WRITE,
                         MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) == MAP_FAILED)
                    break;
                s->faults++;
                vg_event_count++;
                errno = saved;
                return; /* the access is restarted and finds zeros */
            }
        }
    }
    sigaction(SIGBUS, &vg_old_bus, NULL);
    if (si->si_code <= 0)
        raise(SIGBUS); /* pending until we return, then the previous action */
    errno = saved;
}

/* Our handler on SIGBUS (again, if someone replaced it since). 0 or -errno. */
static int vg_install(void)
{
    struct sigaction cur, sa;

    if (sigaction(SIGBUS, NULL, &cur) < 0)
        return -errno;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == vg_on_sigbus)
        return 0;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = vg_on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &vg_old_bus) < 0)
        return -errno;
    return 0;
}

/* Register [start, start + len) (page: the mapping's page size, a power of two). The slot
 * index, or -ENOSPC, -EINVAL, -errno. */
int vg_register(uintptr_t start, uintptr_t len, uintptr_t page)
{
    int i, rc;

    if (!len || !page || (page & (page - 1)) || start + len < start)
        return -EINVAL;
    rc = vg_install();
    if (rc < 0)
        return rc;
    for (i = 0; i < VG_SLOTS; i++) {
        if (!vg_slots[i].end) {
            vg_slots[i].start = start;
            vg_slots[i].page = page;
            vg_slots[i].faults = 0;
            __atomic_store_n(&vg_slots[i].end, start + len, __ATOMIC_SEQ_CST);
            return i;
        }
    }
    return -ENOSPC;
}

void vg_unregister(int slot)
{
    if (slot >= 0 && slot < VG_SLOTS)
        __atomic_store_n(&vg_slots[slot].end, 0, __ATOMIC_SEQ_CST);
}

long vg_faults(int slot)
{
    return slot >= 0 && slot < VG_SLOTS ? vg_slots[slot].faults : 0;
}

long vg_events(void)
{
    return vg_event_count;
}

/* --- eventfds ----------------------------------------------------------------------------- */

/* Read an eventfd's counter without ever blocking. 1: read, 0: it was 0 (EAGAIN), -errno. */
int vg_eventfd_drain(int fd)
{
    uint64_t v;
    struct iovec iov = { &v, sizeof(v) };
    ssize_t n = preadv2(fd, &iov, 1, -1, RWF_NOWAIT);

    if (n == (ssize_t)sizeof(v))
        return 1;
    if (n < 0)
        return errno == EAGAIN ? 0 : -errno;
    return -EIO; /* 0 or a short read: not an eventfd */
}

#define VG_WATCHDOG_NS 100000000LL /* a blocked eventfd write ends within this */

static int vg_wd_ready;
static pthread_t vg_wd_thread;
static timer_t vg_wd_timer;
static long long vg_wd_until; /* CLOCK_MONOTONIC ns when the armed timer expires */

static void vg_on_watchdog(int sig)
{
    (void)sig; /* its only job: interrupt a blocked write (the action has no SA_RESTART) */
}

/* Set up the write watchdog for the calling thread (the loop's). 0 or -errno. */
int vg_watchdog_init(void)
{
    struct sigaction sa;
    struct sigevent sev;

    if (vg_wd_ready)
        return pthread_equal(pthread_self(), vg_wd_thread) ? 0 : -EBUSY;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = vg_on_watchdog;
    sa.sa_flags = 0; /* no SA_RESTART */
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGRTMIN + 6, &sa, NULL) < 0)
        return -errno;
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIGRTMIN + 6;
    sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
    if (timer_create(CLOCK_MONOTONIC, &sev, &vg_wd_timer) < 0)
        return -errno;
    vg_wd_thread = pthread_self();
    vg_wd_ready = 1;
    return 0;
}

int vg_watchdog_signal(void)
{
    return SIGRTMIN + 6;
}

/* Add 1 to an eventfd. 0: done, 1: its counter is full (the reader has a notification
 * pending anyway), -EINTR: the write blocked and the watchdog ended it, -errno otherwise.
 * The watchdog is armed lazily: only when less than half its period is left, so a busy loop
 * re-arms it at most twice a period and an idle one never (it fires once after a burst). */
int vg_eventfd_signal(int fd)
{
    uint64_t one = 1;
    ssize_t n;

    if (vg_wd_ready && pthread_equal(pthread_self(), vg_wd_thread)) {
        struct timespec now;
        long long t;

        clock_gettime(CLOCK_MONOTONIC, &now); /* vDSO: no system call */
        t = now.tv_sec * 1000000000LL + now.tv_nsec;
        if (t + VG_WATCHDOG_NS / 2 > vg_wd_until) {
            struct itimerspec its;

            memset(&its, 0, sizeof(its));
            its.it_value.tv_nsec = VG_WATCHDOG_NS;
            if (timer_settime(vg_wd_timer, 0, &its, NULL) == 0)
                vg_wd_until = t + VG_WATCHDOG_NS;
        }
    }
    n = write(fd, &one, sizeof(one));
    if (n == (ssize_t)sizeof(one))
        return 0;
    if (n < 0) {
        if (errno == EAGAIN)
            return 1;
        if (errno == EINTR)
            vg_event_count++;
        return -errno;
    }
    return -EIO;
}
