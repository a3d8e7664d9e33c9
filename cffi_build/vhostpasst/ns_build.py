"""cffi build script for the namespace helpers (setns, unshare, mount, pivot_root, umount2,
inotify)."""

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef(
    """
    int vp_setns(int fd, int nstype);
    int vp_unshare(int flags);
    int vp_mount(const char *source, const char *target, const char *fstype,
                 unsigned long flags, const char *data);
    int vp_pivot_root(const char *new_root, const char *put_old);
    int vp_umount2(const char *target, int flags);
    int vp_inotify_init1(int flags);
    int vp_inotify_add_watch(int fd, const char *path, uint32_t mask);
    """
)
ffibuilder.set_source(
    "vhostpasst._ns",
    (Path(__file__).parent / "ns.c").read_text(),
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
