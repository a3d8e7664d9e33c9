/* Namespace, mount and inotify system calls Python 3.11 lacks (os.setns/os.unshare came in
 * 3.12; mount, pivot_root, umount2 and inotify were never in the standard library). Thin wrappers: each returns
 * what libc returns; the caller reads errno through cffi. */
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <sys/inotify.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <unistd.h>

int vp_setns(int fd, int nstype) { return setns(fd, nstype); }
int vp_unshare(int flags) { return unshare(flags); }
int vp_mount(const char *source, const char *target, const char *fstype,
             unsigned long flags, const char *data)
{
	return mount(source, target, fstype, flags, data);
}
int vp_pivot_root(const char *new_root, const char *put_old)
{
	return syscall(SYS_pivot_root, new_root, put_old); /* no glibc wrapper */
}
int vp_umount2(const char *target, int flags) { return umount2(target, flags); }
int vp_inotify_init1(int flags) { return inotify_init1(flags); }
int vp_inotify_add_watch(int fd, const char *path, uint32_t mask)
{
	return inotify_add_watch(fd, path, mask);
}
