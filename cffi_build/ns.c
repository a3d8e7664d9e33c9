/* Namespace, mount and inotify system calls Python 3.11 lacks (os.setns/os.unshare came in
 * 3.12; mount and inotify were never in the standard library). Thin wrappers: each returns
 * what libc returns; the caller reads errno through cffi. */
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <sys/inotify.h>
#include <sys/mount.h>

int vp_setns(int fd, int nstype) { return setns(fd, nstype); }
int vp_unshare(int flags) { return unshare(flags); }
int vp_mount(const char *source, const char *target, const char *fstype,
             unsigned long flags, const char *data)
{
	return mount(source, target, fstype, flags, data);
}
int vp_inotify_init1(int flags) { return inotify_init1(flags); }
int vp_inotify_add_watch(int fd, const char *path, uint32_t mask)
{
	return inotify_add_watch(fd, path, mask);
}
